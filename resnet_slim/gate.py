"""The release gate: compare the release model with the FP32 reference, fail closed.

Each check reads measured numbers from the benchmark results. A missing model, a missing key,
a non-number or a NaN is not "unknown, so pass": it fails that check with the reason named.
"""

import math

from resnet_slim.params import GateParams


def _number(results: dict, model: str, key: str, *, positive: bool = False
            ) -> tuple[float | None, str | None]:
    """(value, None) for a finite (and, if asked, positive) metric, else (None, the reason)."""
    entry = results.get(model)
    if not isinstance(entry, dict):
        return None, f"no benchmark results for model '{model}'"
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"metric {model}.{key} is missing or not a number ({value!r})"
    if not math.isfinite(value):
        return None, f"metric {model}.{key} is {value}"
    if positive and value <= 0:
        return None, f"metric {model}.{key} is {value}, must be > 0"
    return float(value), None


def _pair(results: dict, ref: str, rel: str, key: str, *, positive: bool = False):
    """(reference value, release value, the first problem with either or None)."""
    ref_value, ref_error = _number(results, ref, key, positive=positive)
    rel_value, rel_error = _number(results, rel, key, positive=positive)
    return ref_value, rel_value, ref_error or rel_error


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
    ref_top1, rel_top1, error = _pair(results, ref, rel, "top1")
    ref_ms, rel_ms, ms_error = _pair(results, ref, rel, "p50_ms", positive=True)
    ref_mb, rel_mb, mb_error = _pair(results, ref, rel, "size_mb", positive=True)
    checks = [
        _check("accuracy_drop_pp", measured=None if error else ref_top1 - rel_top1,
               threshold=g.max_acc_drop_pp, op="<=", unit="pp", error=error),
        _check("latency_speedup", measured=None if ms_error else ref_ms / rel_ms,
               threshold=g.min_speedup, op=">=", unit="x", error=ms_error),
        _check("size_ratio", measured=None if mb_error else rel_mb / ref_mb,
               threshold=g.max_size_ratio, op="<=", unit="x", error=mb_error),
    ]
    if g.max_size_mb is not None:
        size, size_error = _number(results, rel, "size_mb", positive=True)
        checks.append(_check("size_mb", measured=size, threshold=g.max_size_mb, op="<=",
                             unit="MB", error=size_error))

    failed = [c["reason"] for c in checks if not c["passed"]]
    return {"passed": not failed, "release": rel, "reference": ref, "enforce": g.enforce,
            "checks": checks, "failed": failed}
