"""The release gate: compare the release model with the FP32 reference, fail closed.

Each check reads measured numbers from the benchmark results. A missing model, a missing key,
a non-number or a NaN is not "unknown, so pass": it fails that check with the reason named.
"""

import math

from resnet_slim.params import GateParams


def _number(results: dict, model: str, key: str) -> tuple[float | None, str | None]:
    entry = results.get(model)
    if not isinstance(entry, dict):
        return None, f"no benchmark results for model '{model}'"
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"metric {model}.{key} is missing or not a number ({value!r})"
    if not math.isfinite(value):
        return None, f"metric {model}.{key} is {value}"
    return float(value), None


def _check(name: str, *, measured, threshold, op: str, unit: str, error: str | None) -> dict:
    if error is not None:
        return {"name": name, "passed": False, "measured": None, "threshold": threshold,
                "op": op, "unit": unit, "reason": error}
    passed = measured <= threshold if op == "<=" else measured >= threshold
    return {"name": name, "passed": bool(passed), "measured": round(measured, 6),
            "threshold": threshold, "op": op, "unit": unit,
            "reason": None if passed else f"{name} {measured:.4g} {unit} is not {op} {threshold}"}


def evaluate_gate(results: dict, g: GateParams) -> dict:
    """Gate the release model; with `release: auto`, pick the fastest candidate that passes.

    Returns {"passed", "release", "reference", "checks", "failed", "selection"}.
    """
    if g.release != "auto":
        return {**check_release(results, g, g.release), "selection": None}
    if not g.candidates:
        verdict = check_release(results, g, "auto")
        return {**verdict, "failed": ["gate.release is auto but gate.candidates is empty"],
                "passed": False, "selection": None}
    verdicts = [check_release(results, g, name) for name in g.candidates]
    passing = [v for v in verdicts if v["passed"]]
    speed = {c: _number(results, c, "p50_ms")[0] for c in g.candidates}
    if passing:
        chosen = min(passing, key=lambda v: speed[v["release"]])
        why = (f"fastest of {len(passing)} candidate(s) passing every check "
               f"(p50 {speed[chosen['release']]:.4g} ms)")
    else:
        chosen = verdicts[0]  # report the first candidate's checks; every failure is listed
        why = "no candidate passed every check"
        chosen = {**chosen, "failed": [f"{v['release']}: {f}" for v in verdicts for f in v["failed"]]}
    selection = {"why": why, "candidates": [
        {"model": v["release"], "passed": v["passed"], "p50_ms": speed[v["release"]],
         "failed": v["failed"]} for v in verdicts]}
    return {**chosen, "selection": selection}


def check_release(results: dict, g: GateParams, rel: str) -> dict:
    """Every check for one release model against the reference."""
    ref = g.reference
    checks = []

    ref_top1, err1 = _number(results, ref, "top1")
    rel_top1, err2 = _number(results, rel, "top1")
    drop = None if (err1 or err2) else ref_top1 - rel_top1
    checks.append(_check("accuracy_drop_pp", measured=drop, threshold=g.max_acc_drop_pp, op="<=",
                         unit="pp", error=err1 or err2))

    ref_ms, err1 = _number(results, ref, "p50_ms")
    rel_ms, err2 = _number(results, rel, "p50_ms")
    if not (err1 or err2) and rel_ms <= 0:
        err2 = f"metric {rel}.p50_ms is {rel_ms}, not a latency"
    speedup = None if (err1 or err2) else ref_ms / rel_ms
    checks.append(_check("latency_speedup", measured=speedup, threshold=g.min_speedup, op=">=",
                         unit="x", error=err1 or err2))

    ref_mb, err1 = _number(results, ref, "size_mb")
    rel_mb, err2 = _number(results, rel, "size_mb")
    if not (err1 or err2) and ref_mb <= 0:
        err1 = f"metric {ref}.size_mb is {ref_mb}, not a file size"
    ratio = None if (err1 or err2) else rel_mb / ref_mb
    checks.append(_check("size_ratio", measured=ratio, threshold=g.max_size_ratio, op="<=",
                         unit="x", error=err1 or err2))
    if g.max_size_mb is not None:
        checks.append(_check("size_mb", measured=rel_mb, threshold=g.max_size_mb, op="<=",
                             unit="MB", error=err2))

    failed = [c["reason"] for c in checks if not c["passed"]]
    return {"passed": not failed, "release": rel, "reference": ref, "enforce": g.enforce,
            "checks": checks, "failed": failed}
