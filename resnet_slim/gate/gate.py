"""The release gate: compare the release model with the FP32 reference, fail closed.

Each check reads measured numbers from the benchmark results. A missing model, a missing key,
a non-number, a NaN or a number outside what can be measured is not "unknown, so pass": it fails
that check with the reason named. With an evidence chain (`resnet_slim.measure.evidence.verify`),
every release also gets an `evidence` check: its problems, and the reference's, fail it.
"""

import json
import math
from pathlib import Path

import numpy as np

from resnet_slim import stats
from resnet_slim.gate.metrics import headline_metrics
from resnet_slim.gate.verdict import vouched_files
from resnet_slim.io import write_json, write_together
from resnet_slim.measure import evidence as chain_of
from resnet_slim.measure.evidence import MEASUREMENT_RANGES
from resnet_slim.params import BenchmarkParams, GateParams, Params


class Evidence:
    """What the accuracy check can use beyond the point top-1s: per-image correctness of each model
    (same test images, so the drop can be paired) and per-seed top-1s from seed repeats.

    `correct_error` says why there is no per-image correctness; `malformed` means a predictions file
    was there but unusable, which fails the accuracy check under either statistic. `problems`
    (None: no chain was verified) and `model_problems` come from `evidence.verify`."""

    def __init__(
        self,
        correct: dict[str, np.ndarray] | None = None,
        correct_error: str | None = None,
        seeds: dict | None = None,
        ci: BenchmarkParams | None = None,
        malformed: bool = False,
        problems: list[str] | None = None,
        model_problems: dict[str, list[str]] | None = None,
    ):
        self.correct, self.correct_error, self.seeds = correct or {}, correct_error, seeds
        self.ci = ci or BenchmarkParams()  # params.yaml's benchmark defaults
        self.malformed, self.problems, self.model_problems = (
            malformed,
            problems,
            model_problems or {},
        )


def _number(
    results: dict, model: str, key: str, *, positive: bool = False
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
    low, high = MEASUREMENT_RANGES.get(key, (-math.inf, math.inf))
    if not low <= value <= high:
        return None, f"metric {model}.{key} is {value:g}, outside [{low:g}, {high:g}]"
    return float(value), None


def _pair(results: dict, ref: str, rel: str, key: str, *, positive: bool = False):
    """(reference value, release value, the first problem with either or None)."""
    ref_value, ref_error = _number(results, ref, key, positive=positive)
    rel_value, rel_error = _number(results, rel, key, positive=positive)
    return ref_value, rel_value, ref_error or rel_error


def _check(name: str, *, measured, threshold, op: str, unit: str, error: str | None) -> dict:
    if error is None and (measured is None or not math.isfinite(measured)):
        error = f"measured value is {measured}"
    if error is not None:
        return {
            "name": name,
            "passed": False,
            "measured": None,
            "threshold": threshold,
            "op": op,
            "unit": unit,
            "reason": f"{name}: {error}",
        }
    passed = measured <= threshold if op == "<=" else measured >= threshold
    return {
        "name": name,
        "passed": bool(passed),
        "measured": round(measured, 6),
        "threshold": threshold,
        "op": op,
        "unit": unit,
        "reason": None if passed else f"{name} {measured:.4g} {unit} is not {op} {threshold}",
    }


def _seed_drops(seeds: dict | None, ref: str, rel: str) -> tuple[list[float], list[int]] | None:
    """Per-seed drops (reference − release, pp, same seed) when seed repeats cover both models."""
    runs = (seeds or {}).get("runs") or []
    pairs = [
        (r["seed"], r["top1"].get(ref), r["top1"].get(rel))
        for r in runs
        if isinstance(r, dict) and isinstance(r.get("top1"), dict)
    ]
    pairs = [
        (seed, a, b)
        for seed, a, b in pairs
        if isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and 0 <= a <= 100
        and 0 <= b <= 100
    ]
    if len(pairs) < 2:
        return None
    return [a - b for _, a, b in pairs], [seed for seed, _, _ in pairs]


def accuracy_check(results: dict, g: GateParams, rel: str, evidence: Evidence) -> dict:
    """The top-1 drop check, gated on `g.acc_drop_statistic` (point or upper end of the CI).

    With seed repeats of both models the drop is the mean over seeds and its CI a t-interval across
    seeds; otherwise the paired bootstrap over test images of this run. The check records the point
    drop, the CI and McNemar's p so the report can say what the data support.
    """
    ref, level = g.reference, evidence.ci.ci_level
    ref_top1, rel_top1, error = _pair(results, ref, rel, "top1")
    details: dict = {"statistic": g.acc_drop_statistic, "level": level}
    point = None if error else ref_top1 - rel_top1
    seed_drops = _seed_drops(evidence.seeds, ref, rel)
    if seed_drops is not None:
        drops, seeds = seed_drops
        summary = stats.across_seeds(drops, level=level)
        point = summary["mean"]
        details.update(
            basis="seeds",
            seeds=seeds,
            per_seed_drop_pp=[round(d, 4) for d in drops],
            std_pp=summary["std"],
            ci=[summary["ci_low"], summary["ci_high"]],
        )
    elif ref in evidence.correct and rel in evidence.correct:
        try:
            paired = stats.paired_drop(
                evidence.correct[ref],
                evidence.correct[rel],
                level=level,
                resamples=evidence.ci.bootstrap_resamples,
                seed=evidence.ci.bootstrap_seed,
            )
        except ValueError as err:
            paired, error = None, error or f"cannot pair {ref} and {rel}: {err}"
        if paired is not None:
            point = None if error else paired["drop_pp"]
            details.update(
                basis="paired bootstrap over test images",
                n_test=paired["n"],
                ci=[paired["ci_low"], paired["ci_high"]],
                mcnemar_p=paired["mcnemar"]["p_value"],
                ref_only_correct=paired["mcnemar"]["ref_only_correct"],
                release_only_correct=paired["mcnemar"]["release_only_correct"],
            )
    elif error is None and (g.acc_drop_statistic == "upper_ci" or evidence.malformed):
        missing = [m for m in (ref, rel) if m not in evidence.correct]
        error = evidence.correct_error or f"no per-image predictions for {missing}"
        if g.acc_drop_statistic == "upper_ci":
            error += (
                "; cannot compute the CI of the drop "
                "(gate.acc_drop_statistic: point gates on the point drop)"
            )
    ci = details.get("ci")
    if ci is not None and None not in ci:
        # undecided: the interval straddles the threshold (the drop may or may not exceed it)
        width, threshold = ci[1] - ci[0], g.max_acc_drop_pp
        details.update(ci_width_pp=width, decidable=not ci[0] <= threshold < ci[1])
        if not details["decidable"] and details.get("n_test") and width > threshold > 0:
            details["images_needed"] = stats.images_needed(details["n_test"], width, threshold)
    measured = point
    if g.acc_drop_statistic == "upper_ci" and error is None:
        measured = ci[1] if ci is not None and ci[1] is not None else None
        if measured is None:
            error = "the CI of the drop needs 2+ seeds or per-image predictions"
    check = _check(
        "accuracy_drop_pp",
        measured=measured,
        threshold=g.max_acc_drop_pp,
        op="<=",
        unit="pp",
        error=error,
    )
    return {**check, "point": None if point is None else round(point, 6), **details}


def _round_times(results: dict, model: str) -> tuple[list | None, str | None]:
    """(a model's per-round median ms, None), (None, None) when it has none, or (None, why) when
    what it has is not a list of numbers."""
    rounds = (results.get(model) or {}).get("round_p50_ms")
    if rounds is None:
        return None, None
    if not isinstance(rounds, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in rounds
    ):
        return None, f"{model}.round_p50_ms is not a list of numbers"
    return rounds, None


def speedup_check(results: dict, g: GateParams, rel: str, ci: BenchmarkParams) -> dict:
    """The latency check, gated on `g.speedup_statistic` (point or lower end of the CI).

    With both models timed in the same rounds, the speed-up is the median of per-round ratios with
    a bootstrap CI over rounds (stats.ratio_of_rounds); otherwise the ratio of the two p50s, which
    has no interval. The check records the point, the CI and whether the CI decides the threshold.
    """
    ref = g.reference
    ref_ms, rel_ms, error = _pair(results, ref, rel, "p50_ms", positive=True)
    details: dict = {"statistic": g.speedup_statistic, "level": ci.ci_level}
    point = None if error else ref_ms / rel_ms
    (ref_rounds, ref_bad), (rel_rounds, rel_bad) = (
        _round_times(results, ref),
        _round_times(results, rel),
    )
    error = error or ref_bad or rel_bad
    if error is None and ref_rounds is not None and rel_rounds is not None:
        try:
            ratio = stats.ratio_of_rounds(
                ref_rounds,
                rel_rounds,
                level=ci.ci_level,
                resamples=ci.bootstrap_resamples,
                seed=ci.bootstrap_seed,
            )
        except ValueError as err:
            error = f"cannot pair the rounds of {ref} and {rel}: {err}"
        else:
            point = ratio["ratio"]
            details.update(
                basis="interleaved rounds",
                rounds=ratio["rounds"],
                ci=[round(ratio["ci_low"], 6), round(ratio["ci_high"], 6)],
            )
    elif error is None:
        details["basis"] = "ratio of p50s (not timed in the same rounds)"
        if g.speedup_statistic == "lower_ci":
            missing = [m for m, r in ((ref, ref_rounds), (rel, rel_rounds)) if r is None]
            error = (
                f"no per-round times for {missing}; cannot compute the CI of the speed-up "
                f"(gate.speedup_statistic: point gates on the ratio of p50s)"
            )
    interval = details.get("ci")
    if interval is not None:
        details["decidable"] = not interval[0] < g.min_speedup <= interval[1]
    measured = point
    if g.speedup_statistic == "lower_ci" and error is None:
        measured = interval[0]
    check = _check(
        "latency_speedup",
        measured=None if error else measured,
        threshold=g.min_speedup,
        op=">=",
        unit="x",
        error=error,
    )
    return {**check, "point": None if point is None or error else round(point, 6), **details}


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
    speed = {c: _number(results, c, "p50_ms")[0] for c in g.candidates}
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
    ref_mb, rel_mb, mb_error = _pair(results, ref, rel, "size_mb", positive=True)
    checks = [
        accuracy_check(results, g, rel, evidence),
        speedup_check(results, g, rel, evidence.ci),
        _check(
            "size_ratio",
            measured=None if mb_error else rel_mb / ref_mb,
            threshold=g.max_size_ratio,
            op="<=",
            unit="x",
            error=mb_error,
        ),
    ]
    if g.max_size_mb is not None:
        size, size_error = _number(results, rel, "size_mb", positive=True)
        checks.append(
            _check(
                "size_mb",
                measured=size,
                threshold=g.max_size_mb,
                op="<=",
                unit="MB",
                error=size_error,
            )
        )
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


def evidence_check(evidence: Evidence, ref: str, rel: str) -> dict:
    """Fails on any problem with the evidence as a whole, the reference's or the release's."""
    problems = [
        *evidence.problems,
        *evidence.model_problems.get(ref, []),
        *(evidence.model_problems.get(rel, []) if rel != ref else []),
    ]
    return {
        "name": "evidence",
        "passed": not problems,
        "measured": len(problems),
        "threshold": 0,
        "op": "<=",
        "unit": "problems",
        "problems": problems,
        "reason": "evidence: " + "; ".join(problems) if problems else None,
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
