"""Headline metrics: the few numbers a reviewer diffs between commits and experiments.

`dvc metrics diff` / `dvc exp show` read reports/metrics.json, written by the gate stage: a flat
record of the release (top-1, drop and its CI, McNemar p, speed-ups, size, memory, verdict) and
every gate check keyed by its name. The big per-model tables (benchmark.json, gate.json) stay plain
outputs: hundreds of keys there would drown the comparison.
"""

from resnet_slim import stats
from resnet_slim.io import finite_number


def best_peer_int8(models: dict, reference: str) -> str | None:
    """The fastest INT8 build of the reference by another tool (ORT static PTQ, OpenVINO + NNCF)."""
    peers = [
        n
        for n, m in models.items()
        if n.startswith(reference + "_")
        and "int8" in n
        and "dynamic" not in n
        and m.get("runtime") != "pytorch"
        and finite_number(m.get("p50_ms"))
    ]
    return min(peers, key=lambda n: models[n]["p50_ms"]) if peers else None


def _ratio(numerator, denominator) -> float | None:
    a, b = finite_number(numerator), finite_number(denominator)
    return round(a / b, 4) if a is not None and b else None


def speedup(models: dict, slower: str, faster: str, ci=None, *, all_cores: bool = False) -> dict:
    """How many times faster `faster` is than `slower`: {"ratio", "ci"}. From the two models'
    per-round medians (same interleaved rounds: the median of per-round ratios, bootstrap CI at
    the benchmark section's `ci`) where both have them, else the ratio of their p50s, no CI.
    `all_cores`: the same for the every-core timings."""
    a, b = models.get(slower) or {}, models.get(faster) or {}
    suffix = "_all_cores" if all_cores else ""
    rounds_a, rounds_b = a.get("round_p50_ms" + suffix), b.get("round_p50_ms" + suffix)
    if isinstance(rounds_a, list) and isinstance(rounds_b, list):
        try:
            r = stats.ratio_of_rounds(
                rounds_a,
                rounds_b,
                **(
                    {}
                    if ci is None
                    else dict(
                        level=ci.ci_level, resamples=ci.bootstrap_resamples, seed=ci.bootstrap_seed
                    )
                ),
            )
        except (ValueError, TypeError):
            pass  # not comparable round by round: fall back to the p50s
        else:
            return {
                "ratio": round(r["ratio"], 4),
                "ci": [round(r["ci_low"], 4), round(r["ci_high"], 4)],
            }
    return {"ratio": _ratio(a.get("p50_ms" + suffix), b.get("p50_ms" + suffix)), "ci": None}


def _significant(value, digits: int = 3) -> float | None:
    value = finite_number(value)
    return None if value is None else float(f"{value:.{digits}g}")


def _rounded(value, digits: int = 4) -> float | None:
    value = finite_number(value)
    return None if value is None else round(value, digits)


def headline_metrics(verdict: dict, models: dict, ci=None) -> dict:
    """reports/metrics.json from the gate's verdict and the benchmark rows (at most ~30 keys).
    `ci`: the benchmark section (level, resamples, seed of the speed-up intervals)."""
    rel, ref = verdict.get("release"), verdict.get("reference")
    release, teacher = models.get(rel) or {}, models.get(ref) or {}
    checks = {c["name"]: c for c in verdict.get("checks") or [] if isinstance(c, dict)}
    accuracy = checks.get("accuracy_drop_pp") or {}
    ci_drop = accuracy.get("ci") or [None, None]
    peer = best_peer_int8(models, ref) if ref else None
    vs_ref = speedup(models, ref, rel, ci) if ref and rel else {"ratio": None, "ci": None}
    vs_peer = speedup(models, peer, rel, ci) if peer and rel else {"ratio": None, "ci": None}
    vs_ref_ci, vs_peer_ci = vs_ref["ci"] or [None, None], vs_peer["ci"] or [None, None]
    return {
        "release": rel,
        "passed": bool(verdict.get("passed")),
        "top1": _rounded(release.get("top1")),
        "reference_top1": _rounded(teacher.get("top1")),
        "drop_pp": _rounded(accuracy.get("point")),
        "drop_ci_low_pp": _rounded(ci_drop[0]),
        "drop_ci_high_pp": _rounded(ci_drop[1]),
        "mcnemar_p": _significant(accuracy.get("mcnemar_p")),  # 1.8e-08 must not read as 0
        "p50_ms": _rounded(release.get("p50_ms")),
        "speedup_vs_reference": vs_ref["ratio"],
        "speedup_vs_reference_ci_low": vs_ref_ci[0],
        "speedup_vs_reference_ci_high": vs_ref_ci[1],
        "best_peer_int8": peer,
        "speedup_vs_best_peer_int8": vs_peer["ratio"],
        "speedup_vs_best_peer_int8_ci_low": vs_peer_ci[0],
        "speedup_vs_best_peer_int8_ci_high": vs_peer_ci[1],
        "size_mb": _rounded(release.get("size_mb")),
        "size_ratio": _ratio(release.get("size_mb"), teacher.get("size_mb")),
        "peak_rss_mb": _rounded(release.get("peak_rss_mb"), 1),
        # one entry per check, so `dvc metrics diff` shows each verdict and measurement
        "checks": {
            name: {"passed": bool(c.get("passed")), "measured": _rounded(c.get("measured"))}
            for name, c in checks.items()
        },
    }
