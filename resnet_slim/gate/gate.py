"""The release gate: compare the release model with the FP32 reference, fail closed.

The checks themselves (accuracy, speed-up, size, evidence) are in checks.py; this module runs them
for the release (or, with `release: auto`, for every candidate, choosing the fastest that passes),
checks the evidence chain first (`resnet_slim.measure.evidence.verify`), says in words what the
data support, and writes gate.json with the headline metrics.
"""

import json
from pathlib import Path

from resnet_slim.gate.checks import (
    Evidence,
    accuracy_check,
    evidence_check,
    metric_value,
    size_checks,
    speedup_check,
)
from resnet_slim.gate.metrics import headline_metrics
from resnet_slim.gate.verdict import vouched_files
from resnet_slim.io import write_json, write_together
from resnet_slim.measure import evidence as chain_of
from resnet_slim.params import BenchmarkParams, GateParams, Params


def speedup_sentence(check: dict) -> str:
    """What the timing supports about the speed-up, in one sentence (report and gate log)."""
    ci, level = check.get("ci"), check.get("level", 0.95)
    point, threshold = check.get("point"), check.get("threshold")
    if point is None:
        return f"speed-up: no estimate ({check.get('reason') or 'not measured'})."
    if ci is None:
        return f"speed-up {point:.2f}x ({check.get('basis', 'ratio of p50s')}; no interval)."
    what = (
        f"speed-up {point:.2f}x, {level:.0%} CI [{ci[0]:.2f}, {ci[1]:.2f}] (median of per-round "
        f"ratios over {check.get('rounds')} interleaved rounds)"
    )
    if ci[0] >= threshold:
        verdict = f"at least {threshold}x with {level:.0%} confidence"
    elif point >= threshold:
        verdict = (
            f"the point meets {threshold}x but the interval does not: the host was too noisy "
            f"to resolve the threshold (more rounds, or a quieter machine, would)"
        )
    else:
        verdict = f"below {threshold}x"
    return f"{what}: {verdict}."


def accuracy_sentence(check: dict) -> str:
    """What the data support about the drop, in one sentence (report and gate log)."""
    ci, level = check.get("ci") or [None, None], check.get("level", 0.95)
    point, threshold = check.get("point"), check.get("threshold")
    if point is None or None in ci:
        return f"top-1 drop: no interval ({check.get('reason') or 'not enough evidence'})"
    if check.get("basis") == "seeds":
        what = (
            f"mean top-1 drop over {len(check.get('seeds') or [])} seeds {point:.2f} pp "
            f"(std {check.get('std_pp') or 0:.2f}), {level:.0%} CI [{ci[0]:.2f}, {ci[1]:.2f}]"
        )
    else:
        p_value = check.get("mcnemar_p")
        what = (
            f"top-1 drop {point:.2f} pp, {level:.0%} CI [{ci[0]:.2f}, {ci[1]:.2f}] (paired "
            f"bootstrap over {check.get('n_test')} test images"
            + (f"; McNemar p = {p_value:.3g}" if p_value is not None else "")
            + ")"
        )
    if ci[1] <= threshold:
        verdict = f"the drop is at most {threshold} pp with {level:.0%} confidence"
    elif point <= threshold:
        verdict = f"the point drop is within {threshold} pp but the interval is not"
    else:
        verdict = f"the drop exceeds {threshold} pp"
    if check.get("decidable") is False:
        verdict += (
            f"; the interval straddles the {threshold} pp threshold, so this test split "
            f"cannot decide"
            + (
                f" (about {check['images_needed']:,} test images would)"
                if check.get("images_needed")
                else ""
            )
        )
    return f"{what}: {verdict}."


def evaluate_gate(results: dict, g: GateParams, evidence: Evidence | None = None) -> dict:
    """Gate the release model; with `release: auto`, pick the fastest candidate that passes.

    Returns {"passed", "release", "reference", "checks", "failed", "selection"}.
    """
    evidence = evidence or Evidence()
    if g.release != "auto":
        return {**check_release(results, g, g.release, evidence), "selection": None}
    if not g.candidates:
        verdict = check_release(results, g, "auto", evidence)
        return {
            **verdict,
            "failed": ["gate.release is auto but gate.candidates is empty"],
            "passed": False,
            "selection": None,
        }
    verdicts = [check_release(results, g, name, evidence) for name in g.candidates]
    passing = [v for v in verdicts if v["passed"]]
    speed = {c: metric_value(results, c, "p50_ms")[0] for c in g.candidates}
    # ranked by the gate's own speed measurement: the speed-up over the reference (per-round ratios)
    speedup = {v["release"]: _check_of(v, "latency_speedup").get("point") for v in verdicts}
    if passing:
        chosen = max(passing, key=lambda v: speedup[v["release"]])
        why = (
            f"fastest of {len(passing)} candidate(s) passing every check "
            f"({speedup[chosen['release']]:.3g}x the reference, p50 "
            f"{speed[chosen['release']]:.4g} ms)"
        )
    else:
        chosen = verdicts[0]  # report the first candidate's checks; every failure is listed
        why = "no candidate passed every check"
        chosen = {
            **chosen,
            "failed": [f"{v['release']}: {f}" for v in verdicts for f in v["failed"]],
        }
    selection = {
        "why": why,
        "candidates": [
            {
                "model": v["release"],
                "passed": v["passed"],
                "p50_ms": speed[v["release"]],
                "speedup": speedup[v["release"]],
                "speedup_ci": _check_of(v, "latency_speedup").get("ci"),
                "failed": v["failed"],
            }
            for v in verdicts
        ],
    }
    return {**chosen, "selection": selection}


def _check_of(verdict: dict, name: str) -> dict:
    return next((c for c in verdict["checks"] if c["name"] == name), {})


def check_release(results: dict, g: GateParams, rel: str, evidence: Evidence | None = None) -> dict:
    """Every check for one release model against the reference."""
    ref = g.reference
    evidence = evidence or Evidence()
    checks = [
        accuracy_check(results, g, rel, evidence),
        speedup_check(results, g, rel, evidence.ci),
        *size_checks(results, g, rel),
    ]
    if evidence.problems is not None:
        checks.append(evidence_check(evidence, ref, rel))

    failed = [c["reason"] for c in checks if not c["passed"]]
    return {
        "passed": not failed,
        "release": rel,
        "reference": ref,
        "enforce": g.enforce,
        "checks": checks,
        "failed": failed,
    }


def reference_origin(teacher_summary: dict | None) -> dict:
    """Where the reference came from, for gate.json: the imported file (path, format, sha256,
    top-1 as imported and after adaptation) or {"trained_here": true}."""
    origin = (teacher_summary or {}).get("origin") if isinstance(teacher_summary, dict) else None
    if not isinstance(origin, dict):
        return {"trained_here": True}
    keys = (
        "file",
        "format",
        "family",
        "sha256",
        "tracked_by_dvc",
        "top1_as_imported",
        "top1_after_adaptation",
    )
    return {key: origin.get(key) for key in keys}


def judge(
    bench,
    seeds,
    params: Params,
    *,
    benchmark: str | Path,
    predictions: str | Path,
    prepared: str | Path,
) -> dict:
    """The verdict on benchmark.json's numbers, with the evidence chain behind them checked.

    Problems with the evidence fail the release's checks (recorded in gate.json), not the stage;
    seed repeats are used only when they match (`evidence.seed_evidence`, its note otherwise)."""
    g = params.gate
    names = judged_models(g)
    chain = chain_of.verify(
        bench, names=names, benchmark=benchmark, predictions=predictions, prepared=prepared
    )
    seeds, seeds_note = chain_of.seed_evidence(seeds, base=params.base, bench=bench, names=names)
    if seeds is None and len({params.base.seed, *params.base.seeds}) >= 2:
        chain.problems.append(f"{seeds_note} (evidence asked for is evidence required)")
        seeds_note = None
    evidence = Evidence(
        correct=chain.correct,
        correct_error=chain.correct_error,
        seeds=seeds,
        ci=params.benchmark,
        malformed=chain.predictions_broken,
        problems=chain.problems,
        model_problems=chain.model_problems,
    )
    verdict = evaluate_gate(benchmark_models(bench), g, evidence)
    verdict["evidence"] = {
        "problems": chain.problems,
        "models": chain.model_problems,
        "n_test": chain.n_test,
    }
    verdict["notes"] = [seeds_note] if seeds_note else []
    release_row = benchmark_models(bench).get(verdict["release"])
    verdict["files"] = vouched_files(
        (release_row or {}).get("file") or f"models/{verdict['release']}.onnx",
        meta=Path(prepared) / "meta.json",
        benchmark=benchmark,
    )
    return verdict


def judged_models(g: GateParams) -> list[str]:
    """The reference, then the release (or, with `release: auto`, every candidate)."""
    return [g.reference, *(g.candidates if g.release == "auto" else [g.release])]


def unreadable_verdict(g: GateParams, error: Exception) -> dict:
    """A failed verdict for inputs that cannot be read: an older, passing gate.json never stays."""
    return {
        "passed": False,
        "release": g.release,
        "reference": g.reference,
        "enforce": g.enforce,
        "checks": [],
        "failed": [str(error)],
        "selection": None,
    }


def benchmark_models(bench) -> dict:
    """benchmark.json's per-model rows, or {} when it has none (the checks then fail)."""
    models = bench.get("models") if isinstance(bench, dict) else None
    return models if isinstance(models, dict) else {}


def write_verdict(
    verdict: dict, bench, *, out: str, metrics: str | None, ci: BenchmarkParams | None = None
) -> list[str]:
    """gate.json; with `metrics`, the headline metrics too, replaced together (gate.json last)."""
    if metrics is None:
        write_json(out, verdict)
        return [out]
    headline = json.dumps(headline_metrics(verdict, benchmark_models(bench), ci), indent=2) + "\n"
    return [
        str(path)
        for path in write_together(
            {"metrics": (metrics, lambda tmp: tmp.write_text(headline))},
            record=out,
            content=verdict,
        )
    ]


def log_lines(verdict: dict) -> list[str]:
    """What the gate stage prints: notes, the reference's origin, every check, the choice."""
    lines = [f"note: {note}" for note in verdict.get("notes", [])]
    origin = verdict.get("reference_origin") or {}
    if origin.get("file"):
        lines.append(
            f"reference '{verdict['reference']}' imported from {origin['file']} (sha256 "
            f"{origin['sha256'][:12]}...)"
        )
    for check in verdict["checks"]:
        mark = "PASS" if check["passed"] else "FAIL"
        lines.append(
            f"{mark} {check['name']}: {check['measured']} {check['op']} {check['threshold']}"
            + (f" ({check['reason']})" if check["reason"] else "")
        )
        if check["name"] == "accuracy_drop_pp" and check.get("ci"):
            lines.append(f"  {accuracy_sentence(check)}")
        if check["name"] == "latency_speedup" and check.get("point") is not None:
            lines.append(f"  {speedup_sentence(check)}")
    if verdict["selection"]:
        lines.append(f"release auto -> '{verdict['release']}': {verdict['selection']['why']}")
    if verdict["passed"]:
        lines.append(f"release '{verdict['release']}' passed every check")
    return lines
