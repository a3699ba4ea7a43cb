"""The report's sections on how the numbers were measured: timing rounds and the host's noise,
seed-to-seed spread, how close each model runs to this CPU's limit, how well the latency table
predicts each model, and the hardware itself.
Blocks as in sections.py.
"""

import pandas as pd

from resnet_slim.io import finite_number
from resnet_slim.measure.timing import SLOW_ROUND
from resnet_slim.report.cells import interval, mark, num, plus_minus


def timing_noise(models: dict, timing: dict | None, s: dict) -> list:
    """How the models were timed, and how much the host's noise moved each of them."""
    blocks = [("h2", "Timing and noise")]
    if not timing:
        return blocks + [
            ("p", "No interleaved timing in benchmark.json: each model was timed alone.")
        ]
    rows = [
        {
            "model": n,
            "p50 ms": finite_number(m.get("p50_ms")),
            "p90 ms": finite_number(m.get("p90_ms")),
            "p99 ms": finite_number(m.get("p99_ms")),
            "round CV": num(m.get("round_cv"), "{:.1%}"),
            f"slow rounds (> {SLOW_ROUND - 1:.0%} over the median)": num(
                m.get("slow_round_fraction"), "{:.0%}"
            ),
        }
        for n, m in models.items()
        if n in (timing.get("models") or [])
    ]
    text = (
        f"Every model below was timed in {timing.get('rounds')} rounds of "
        f"{timing.get('runs_per_round')} batch-1 runs, in a shuffled order each round (seed "
        f"{timing.get('order_seed')}), sessions kept open, after {timing.get('warmup')} warm-up "
        f"runs each and {timing.get('round_warmup')} untimed runs at each turn. A load spike "
        "then lands on every model of its round, and each ratio is formed round by round. "
        "Round CV: the spread of a model's per-round medians."
    )
    blocks += [("p", text), ("table", pd.DataFrame(rows))]
    noisy = [
        n
        for n in (s["reference"], s["release"])
        if (finite_number((models.get(n) or {}).get("slow_round_fraction")) or 0) > 0.1
    ]
    if noisy:
        blocks.append(
            (
                "p",
                f"**⚠ Noisy host:** more than 10% of the rounds of {noisy} were over "
                f"{SLOW_ROUND - 1:.0%} slower than their median; compare ratios from this run "
                "only, and re-run on a quiet machine before trusting absolute milliseconds.",
            )
        )
    return blocks


def seed_repeats(seeds) -> list:
    """Mean ± std per model across seed repeats, and the per-seed drops the gate used."""
    blocks = [("h2", "Seed repeats")]
    if not isinstance(seeds, dict) or not seeds.get("repeats"):
        return blocks + [
            (
                "p",
                "Off (`base.seeds: []`): every number above comes from one training seed. "
                "Run-to-run seed noise is typically 0.3-0.5 pp on CIFAR-sized test sets; "
                "set `base.seeds: [0, 1, 2]` to measure it here.",
            )
        ]
    runs = [r for r in seeds.get("runs") or [] if isinstance(r, dict)]
    rows = []
    for name, summary in (seeds.get("top1") or {}).items():
        drop = (seeds.get("drop_pp") or {}).get(name) or {}
        rows.append(
            {
                "model": name,
                "seeds": len(runs),
                "top-1 mean ± std %": plus_minus(summary.get("mean"), summary.get("std")),
                "per seed %": ", ".join(num(r.get("top1", {}).get(name), "{:.2f}") for r in runs),
                "drop vs ref, mean ± std pp": plus_minus(drop.get("mean"), drop.get("std"))
                if drop
                else "–",
                "drop 95% CI (t, across seeds)": interval(drop.get("ci_low"), drop.get("ci_high"))
                if drop
                else "–",
            }
        )
    return blocks + [
        (
            "p",
            f"Seeds {seeds.get('seeds')}: each re-ran {', '.join(seeds.get('rerun_stages') or [])} "
            "on the same data split; latency and size are not re-measured (they do not depend "
            "on the seed).",
        ),
        ("table", pd.DataFrame(rows)),
    ]


def hardware_limit(models: dict, roofline: dict | None, release: str | None) -> list:
    """MACs per model against this CPU's measured conv throughput (FP32 or INT8 peak)."""
    blocks = [("h2", "How close to the hardware limit")]
    if not isinstance(roofline, dict):
        return blocks + [("p", "Not measured (`benchmark.roofline: false`).")]
    rows = [
        {
            "model": n,
            "MACs (M)": (finite_number(m.get("macs")) or 0) / 1e6,
            "kernels": m.get("peak_kind"),
            "achieved GMAC/s": finite_number(m.get("gmacs_per_s")),
            "floor ms (MACs ÷ peak)": finite_number(m.get("floor_ms")),
            "p50 ms": finite_number(m.get("p50_ms")),
            "of the limit": num(m.get("peak_fraction"), "{:.0%}"),
            "95% CI": interval(*(m.get("peak_fraction_ci") or [None, None]), "{:.2f}"),
            f"p50 ms, {m.get('all_cores', 'all')} cores": finite_number(m.get("p50_ms_all_cores")),
        }
        for n, m in models.items()
        if finite_number(m.get("macs"))
    ]
    text = (
        f"Peak from a conv micro-benchmark on this CPU ({roofline.get('threads')} thread, best of "
        f"{len(roofline.get('shapes') or [])} conv chains): "
        f"**{num(roofline.get('fp32_gmacs'), '{:.1f}')} GMAC/s FP32, "
        f"{num(roofline.get('int8_gmacs'), '{:.1f}')} GMAC/s INT8** "
        f'({num(roofline.get("int8_over_fp32"), "{:.2f}")}× for INT8). "Of the limit" is the floor '
        "latency at that peak over the measured p50. Small models stay far below 100%: "
        "per-op costs (dispatch, re-quantization, pooling, the classifier) do not shrink with the "
        "MAC count, so past a point fewer MACs buy less latency. A model above 100% runs kernels "
        "the micro-benchmark does not (e.g. fused stem convs)."
    )
    rel = models.get(release or "", {})
    if finite_number(rel.get("peak_fraction")) is not None:
        text += (
            f" The release `{release}` does {num(rel.get('macs'), '{:,.0f}')} MACs in "
            f"{num(rel.get('p50_ms'), '{:.3f}')} ms: "
            f"{num(rel.get('peak_fraction'), '{:.0%}')} of the {rel.get('peak_kind')} limit."
        )
    return blocks + [("p", text), ("table", pd.DataFrame(rows))]


def latency_predictions(models: dict, check: dict | None) -> list:
    """The latency table's prediction of each model against its measured p50 (benchmark.json's
    "latency_model"): the pruner's prices are only as good as this."""
    if not isinstance(check, dict):
        return []  # a benchmark without a latency table
    rows = [
        {
            "model": n,
            "predicted ms": finite_number(m.get("predicted_ms")),
            "measured p50 ms": finite_number(m.get("p50_ms")),
            "error": num(m.get("prediction_error"), "{:+.1%}"),
        }
        for n, m in models.items()
        if finite_number(m.get("predicted_ms")) is not None
    ]
    worst, allowed = check.get("max_abs_error"), check.get("max_error_allowed")
    text = (
        "Each model's batch-1 latency as the latency table (`reports/latency_table.json`) "
        "predicts it from its residual blocks, beside the measured p50: worst error "
        f"{num(worst, '{:.1%}')} (trusted within ±{num(allowed, '{:.0%}')}: "
        f"{mark(check.get('all_within'))})."
    )
    if check.get("same_machine") is False:
        text += " **The table was measured on another CPU or onnxruntime: re-run latency_table.**"
    drift = check.get("host_drift") or {}
    if check.get("host_drift_within") is False:
        text += (
            " **The teacher measured "
            + ", ".join(f"{num(d, '{:+.0%}')} ({rt.upper()})" for rt, d in drift.items())
            + " against the table's own timing of it: another host or a loaded one; re-run "
            "latency_table before trusting its prices.**"
        )
    skipped = check.get("not_predicted") or {}
    if skipped:
        text += " Not predicted: " + "; ".join(f"`{n}` ({why})" for n, why in skipped.items())
    blocks = [("h2", "Latency model: predicted vs measured"), ("p", text)]
    return blocks + ([("table", pd.DataFrame(rows))] if rows else [])


def hardware(hw: dict) -> list:
    """Where the numbers were measured, and a warning when INT8 lacks its dot-product
    instructions."""
    blocks = [("h2", "Hardware")]
    if not hw:
        return blocks + [("p", "Not recorded in benchmark.json.")]
    blocks.append(("table", pd.DataFrame([{"": k, "value": str(v)} for k, v in hw.items()])))
    if not (hw.get("avx512_vnni") or hw.get("avx_vnni") or hw.get("amx_int8")):
        blocks.append(
            (
                "p",
                "**⚠ This CPU has no VNNI** (AVX-512 VNNI / AVX-VNNI): int8 dot products go "
                "through 16-bit intermediates, so INT8 speed-ups here are smaller than on a "
                "VNNI CPU (and PTQ uses 7-bit weights, `ptq.reduce_range: auto`). Re-measure "
                "on the target device.",
            )
        )
    return blocks
