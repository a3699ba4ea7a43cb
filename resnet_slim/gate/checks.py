"""The release gate's checks: each compares one measured number of the release with the FP32
reference (or a fixed cap) and fails closed.

Each check reads measured numbers from the benchmark results. A missing model, a missing key,
a non-number, a NaN or a number outside what can be measured is not "unknown, so pass": it fails
that check with the reason named. With an evidence chain (`resnet_slim.measure.evidence.verify`),
every release also gets an `evidence` check: its problems, and the reference's, fail it. The
verdict that combines the checks is assembled in gate.py.
"""

import math

import numpy as np

from resnet_slim import stats
from resnet_slim.measure.evidence import MEASUREMENT_RANGES
from resnet_slim.params import BenchmarkParams, GateParams


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


def metric_value(
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
    ref_value, ref_error = metric_value(results, ref, key, positive=positive)
    rel_value, rel_error = metric_value(results, rel, key, positive=positive)
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
        point, found = _drop_across_seeds(*seed_drops, level=level)
        details.update(found)
    elif ref in evidence.correct and rel in evidence.correct:
        drop, found, pair_error = _paired_drop(evidence, ref, rel)
        error = error or pair_error
        if found:
            point = None if error else drop
            details.update(found)
    elif error is None and (g.acc_drop_statistic == "upper_ci" or evidence.malformed):
        error = _no_predictions(evidence, ref, rel, g.acc_drop_statistic)
    ci = details.get("ci")
    if ci is not None and None not in ci:
        details.update(_drop_decidability(ci, g.max_acc_drop_pp, details.get("n_test")))
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


def _drop_across_seeds(drops: list[float], seeds: list[int], *, level: float) -> tuple:
    """(mean drop, details): the drop over seed repeats, with a t-interval across the seeds."""
    summary = stats.across_seeds(drops, level=level)
    return summary["mean"], {
        "basis": "seeds",
        "seeds": seeds,
        "per_seed_drop_pp": [round(d, 4) for d in drops],
        "std_pp": summary["std"],
        "ci": [summary["ci_low"], summary["ci_high"]],
    }


def _paired_drop(evidence: Evidence, ref: str, rel: str) -> tuple:
    """(drop, details, None) from both models' per-image correctness on the same test images (a
    paired bootstrap CI and McNemar's test), or (None, {}, why they cannot be paired)."""
    try:
        paired = stats.paired_drop(
            evidence.correct[ref],
            evidence.correct[rel],
            level=evidence.ci.ci_level,
            resamples=evidence.ci.bootstrap_resamples,
            seed=evidence.ci.bootstrap_seed,
        )
    except ValueError as err:
        return None, {}, f"cannot pair {ref} and {rel}: {err}"
    return (
        paired["drop_pp"],
        {
            "basis": "paired bootstrap over test images",
            "n_test": paired["n"],
            "ci": [paired["ci_low"], paired["ci_high"]],
            "mcnemar_p": paired["mcnemar"]["p_value"],
            "ref_only_correct": paired["mcnemar"]["ref_only_correct"],
            "release_only_correct": paired["mcnemar"]["release_only_correct"],
        },
        None,
    )


def _no_predictions(evidence: Evidence, ref: str, rel: str, statistic: str) -> str:
    """Why there is no per-image evidence for the drop, and what gating on its CI then needs."""
    missing = [m for m in (ref, rel) if m not in evidence.correct]
    error = evidence.correct_error or f"no per-image predictions for {missing}"
    if statistic == "upper_ci":
        error += (
            "; cannot compute the CI of the drop "
            "(gate.acc_drop_statistic: point gates on the point drop)"
        )
    return error


def _drop_decidability(ci: list, threshold: float, n_test: int | None) -> dict:
    """Whether the CI of the drop decides the threshold, and if not, how many test images would.

    Undecided: the interval straddles the threshold (the drop may or may not exceed it)."""
    width = ci[1] - ci[0]
    found = {"ci_width_pp": width, "decidable": not ci[0] <= threshold < ci[1]}
    if not found["decidable"] and n_test and width > threshold > 0:
        found["images_needed"] = stats.images_needed(n_test, width, threshold)
    return found


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
        ratio, found, error = _ratio_over_rounds(ref_rounds, rel_rounds, ci, ref, rel)
        if found:
            point = ratio
            details.update(found)
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


def _ratio_over_rounds(ref_rounds: list, rel_rounds: list, ci: BenchmarkParams, ref, rel) -> tuple:
    """(speed-up, details, None): the median of per-round ratios with a bootstrap CI over the
    rounds, or (None, {}, why the rounds cannot be paired)."""
    try:
        ratio = stats.ratio_of_rounds(
            ref_rounds,
            rel_rounds,
            level=ci.ci_level,
            resamples=ci.bootstrap_resamples,
            seed=ci.bootstrap_seed,
        )
    except ValueError as err:
        return None, {}, f"cannot pair the rounds of {ref} and {rel}: {err}"
    return (
        ratio["ratio"],
        {
            "basis": "interleaved rounds",
            "rounds": ratio["rounds"],
            "ci": [round(ratio["ci_low"], 6), round(ratio["ci_high"], 6)],
        },
        None,
    )


def size_checks(results: dict, g: GateParams, rel: str) -> list[dict]:
    """The file size against the reference's (`max_size_ratio`) and, if set, `max_size_mb`."""
    ref_mb, rel_mb, mb_error = _pair(results, g.reference, rel, "size_mb", positive=True)
    checks = [
        _check(
            "size_ratio",
            measured=None if mb_error else rel_mb / ref_mb,
            threshold=g.max_size_ratio,
            op="<=",
            unit="x",
            error=mb_error,
        )
    ]
    if g.max_size_mb is not None:
        size, size_error = metric_value(results, rel, "size_mb", positive=True)
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
    return checks


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
