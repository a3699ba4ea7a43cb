"""The report's sections: each function takes the loaded inputs and returns blocks (see render.py).

Numbers are shown as measured; a missing input gives its section a plain "not run" line and a
missing number prints as "–" and fails its checklist line (fail closed, like the gate).
"""

import math
import re

import pandas as pd

from resnet_slim.gate.gate import accuracy_sentence, speedup_sentence
from resnet_slim.gate.metrics import best_peer_int8, speedup
from resnet_slim.io import finite_number
from resnet_slim.measure.timing import SLOW_ROUND
from resnet_slim.report.plots import feasible_region

QUANT_SUFFIX = re.compile(r"_(qat_int8|ptq_dynamic_int8|ptq_int8|torch_eager_int8)$")
PLATEAU_EPOCHS, PLATEAU_PP = 3, 0.5  # "plateaued": the last 3 epochs lie within 0.5 pp
OPS = {"<=": "≤", ">=": "≥"}
CHECK_NAMES = {
    "accuracy_drop_pp": "top-1 drop vs the reference",
    "latency_speedup": "p50 speed-up",
    "size_ratio": "file size / the reference's",
    "size_mb": "file size",
}


def base_model(name: str) -> str:
    """The FP32 model a quantized one came from: student_qat_int8 -> student."""
    return QUANT_SUFFIX.sub("", name)


def gate_settings(inputs: dict) -> dict:
    """reference, release and thresholds: from gate.json (what was judged), else params.yaml."""
    gate, g = inputs["gate"] or {}, inputs["params"].get("gate") or {}
    checks = {c.get("name"): c for c in gate.get("checks") or [] if isinstance(c, dict)}
    release = gate.get("release") or (g.get("release") if g.get("release") != "auto" else None)
    accuracy, latency = checks.get("accuracy_drop_pp", {}), checks.get("latency_speedup", {})
    return {
        "reference": gate.get("reference") or g.get("reference") or "teacher",
        "release": release,
        "max_acc_drop_pp": accuracy.get("threshold", g.get("max_acc_drop_pp")),
        "min_speedup": latency.get("threshold", g.get("min_speedup")),
        "checks": checks,
    }


def region_for(inputs: dict) -> tuple[float, float] | None:
    """The gate's feasible (top-1, p50) region around the reference model."""
    s = gate_settings(inputs)
    ref = inputs["models"].get(s["reference"], {})
    return feasible_region(
        ref.get("top1"), ref.get("p50_ms"), s["max_acc_drop_pp"], s["min_speedup"]
    )


def _ratio(a, b):
    a, b = finite_number(a), finite_number(b)
    return a / b if a is not None and b else None


def _diff(a, b):
    a, b = finite_number(a), finite_number(b)
    return a - b if a is not None and b is not None else None


def model_table(models: dict, reference: str, release: str | None) -> pd.DataFrame:
    """One row per benchmarked model, with ratios against the reference."""
    ref = models.get(reference, {})
    rows = []
    for name, m in models.items():
        torch_row = m.get("runtime") == "pytorch"
        rows.append(
            {
                "model": name,
                "runtime": (
                    "PyTorch eager, measured in PyTorch"
                    if torch_row
                    else m.get("runtime", "onnxruntime")
                ),
                "top-1 %": finite_number(m.get("top1")),
                "95% CI": _interval(m.get("top1_ci_low"), m.get("top1_ci_high")),
                "Δ pp vs ref": _diff(m.get("top1"), ref.get("top1")),
                "params": finite_number(m.get("params")),
                "file MB": finite_number(m.get("size_mb")),
                "p50 ms": finite_number(m.get("p50_ms")),
                "p99 ms": finite_number(m.get("p99_ms")),
                "speed-up ×": (ratio := speedup(models, reference, name))["ratio"],
                "speed-up 95% CI": _interval(*(ratio["ci"] or [None, None]), "{:.2f}"),
                "size × smaller": _ratio(ref.get("size_mb"), m.get("size_mb")),
                "peak RSS MB": finite_number(m.get("peak_rss_mb")),
                "img/s": finite_number(m.get("throughput_ips")),
                "role": "release" if name == release else "reference" if name == reference else "",
            }
        )
    return pd.DataFrame(rows)


def _interval(low, high, fmt="{:.1f}") -> str:
    low, high = finite_number(low), finite_number(high)
    return "–" if low is None or high is None else f"[{fmt.format(low)}, {fmt.format(high)}]"


def _mark(ok) -> str:
    return "✓" if ok else "✗"


def _f(value, fmt="{:.4g}", unit="") -> str:
    return "–" if finite_number(value) is None else fmt.format(value) + unit


def headline(inputs: dict) -> list:
    """Release model, gate verdict with every check, why the release was chosen."""
    gate, s = inputs["gate"], gate_settings(inputs)
    if not isinstance(gate, dict):
        return [("h1", "resnet-slim report"), ("p", "**Gate: not run** (no reports/gate.json).")]
    verdict = "✓ PASSED" if gate.get("passed") else "✗ FAILED"
    enforce = (
        "" if gate.get("enforce", True) else " (gate.enforce is false: recorded, not enforced)"
    )
    items = [
        f"{_mark(c.get('passed'))} {CHECK_NAMES.get(c.get('name'), c.get('name'))} "
        f"(`{c.get('name')}`): {_f(c.get('measured'))} {c.get('unit', '')} "
        f"{OPS.get(c.get('op'), c.get('op'))} {c.get('threshold')} {c.get('unit', '')}"
        + (f" — {c['reason']}" if c.get("reason") else "")
        + (
            " (negative: more accurate than the reference)"
            if c.get("name") == "accuracy_drop_pp" and (finite_number(c.get("measured")) or 0) < 0
            else ""
        )
        for c in s["checks"].values()
    ]
    blocks = [
        ("h1", f"resnet-slim report: release `{s['release']}`"),
        (
            "p",
            f"**Gate {verdict}**{enforce}: `{s['release']}` against the FP32 `{s['reference']}`.",
        ),
        ("ul", items),
    ]
    accuracy = s["checks"].get("accuracy_drop_pp")
    if isinstance(accuracy, dict) and accuracy.get("statistic"):
        gated_on = (
            "the upper end of the drop's confidence interval"
            if accuracy["statistic"] == "upper_ci"
            else "the point drop"
        )
        blocks.append(
            (
                "p",
                f"**What the data support:** {accuracy_sentence(accuracy)} The gate "
                f"judged {gated_on} (`gate.acc_drop_statistic: "
                f"{accuracy['statistic']}`).",
            )
        )
        if accuracy.get("decidable") is False:
            need = accuracy.get("images_needed")
            blocks.append(
                (
                    "p",
                    f"**⚠ The test split is too small for this gate to decide:** "
                    f"the {accuracy.get('level', 0.95):.0%} CI of the drop is "
                    f"{accuracy.get('ci_width_pp', 0):.2f} pp wide and straddles the "
                    f"{accuracy.get('threshold')} pp threshold"
                    + (
                        f"; about {need:,} test images would narrow it to the threshold."
                        if need
                        else "; more seeds or more test images would narrow it."
                    ),
                )
            )
    latency = s["checks"].get("latency_speedup")
    if isinstance(latency, dict) and latency.get("statistic"):
        gated_on = (
            "the lower end of the speed-up's confidence interval"
            if latency["statistic"] == "lower_ci"
            else "the point speed-up"
        )
        blocks.append(
            (
                "p",
                f"**What the timing supports:** {speedup_sentence(latency)} The gate judged "
                f"{gated_on} (`gate.speedup_statistic: {latency['statistic']}`).",
            )
        )
        if latency.get("decidable") is False:
            blocks.append(
                (
                    "p",
                    f"**⚠ The host was too noisy for this gate to decide the speed:** the "
                    f"{latency.get('level', 0.95):.0%} CI of the speed-up straddles the "
                    f"{latency.get('threshold')}× threshold; more `benchmark.rounds` or a "
                    f"quieter machine would narrow it.",
                )
            )
    if isinstance(gate.get("selection"), dict):
        sel = gate["selection"]
        blocks.append(("p", f"Why this model: {sel.get('why')}."))
        cands = [
            {
                "candidate": c.get("model"),
                "passed": _mark(c.get("passed")),
                "p50 ms": finite_number(c.get("p50_ms")),
                "speed-up ×": finite_number(c.get("speedup")),
                "95% CI": _interval(*(c.get("speedup_ci") or [None, None]), "{:.2f}"),
                "failed": "; ".join(c.get("failed") or []) or "–",
            }
            for c in sel.get("candidates") or []
        ]
        if cands:
            blocks.append(("table", pd.DataFrame(cands)))
    return blocks


def comparison(inputs: dict) -> list:
    """Every model's row, then the release against the FP32 reference and INT8 baselines."""
    models, s = inputs["models"], gate_settings(inputs)
    ref, rel = s["reference"], s["release"]
    n_test = finite_number(models.get(ref, {}).get("n_test"))
    blocks = [
        ("h2", "Every model"),
        ("table", model_table(models, ref, rel)),
        (
            "p",
            f"Δ, speed-up and size are against `{ref}`. Latency is batch 1 on onnxruntime "
            "unless the runtime says PyTorch; those rows' peak RSS is the whole PyTorch "
            "process (calibration included), so compare their latency, not their memory.",
        ),
    ]
    if n_test:
        blocks.append(
            (
                "p",
                f"The test split has {n_test:.0f} images: one image is "
                f"{100 / n_test:.2f} pp, so top-1 differences of a few images are noise.",
            )
        )
    if rel not in models:
        return blocks + [("p", f"No benchmark row for the release `{rel}`: no ratios.")]
    peers = [ref] + [n for n in models if n != rel and models[n].get("role") == "peer"]
    peers += [n for n in models if n.endswith("_ptq_int8") and n != rel and "dynamic" not in n]
    m = models[rel]
    rows = [
        {
            "release vs": n,
            "runtime": models[n].get("runtime", "onnxruntime"),
            "latency ×": (ratio := speedup(models, n, rel))["ratio"],
            "95% CI": _interval(*(ratio["ci"] or [None, None]), "{:.2f}"),
            "latency × (all cores)": (every := speedup(models, n, rel, all_cores=True))["ratio"],
            "95% CI (all cores)": _interval(*(every["ci"] or [None, None]), "{:.2f}"),
            "size × smaller": _ratio(models[n].get("size_mb"), m.get("size_mb")),
            "Δ top-1 pp": _diff(m.get("top1"), models[n].get("top1")),
        }
        for n in dict.fromkeys(peers)
        if n in models
    ]
    blocks += [
        ("h2", f"Release `{rel}` vs its baselines"),
        ("table", pd.DataFrame(rows)),
        (
            "p",
            "× > 1: the release is faster / smaller; Δ > 0: the release is more accurate. "
            "Latency ratios are the median of per-round ratios (every model timed in the same "
            "shuffled rounds), with a bootstrap 95% CI over the rounds. "
            "`*_ptq_int8` rows are onnxruntime static post-training quantization; "
            "`*_openvino_*` rows are OpenVINO (FP32, and NNCF INT8): the tools a user "
            "would pick instead of this pipeline.",
        ),
    ]
    best = best_peer_int8(models, ref)
    if best is not None:
        r, b = models[ref], models[best]
        blocks.append(
            (
                "p",
                f"**Release vs the teacher FP32** (`{ref}`): "
                f"{_speedup_text(speedup(models, ref, rel))} faster, "
                f"{_f(_ratio(r.get('size_mb'), m.get('size_mb')), '{:.1f}')}× smaller, "
                f"{_f(_diff(m.get('top1'), r.get('top1')), '{:+.2f}')} pp top-1. "
                f"**Release vs the best peer INT8** (`{best}`, the fastest INT8 build "
                f"of the teacher): "
                f"{_speedup_text(speedup(models, best, rel))} faster, "
                f"{_f(_diff(m.get('top1'), b.get('top1')), '{:+.2f}')} pp top-1.",
            )
        )
    return blocks


def _speedup_text(ratio: dict) -> str:
    """ "24.1× (95% CI 23.5-24.8×)", or the bare ratio where there is no interval."""
    text = _f(ratio["ratio"], "{:.1f}", "×")
    if ratio["ci"]:
        text += f" (95% CI {ratio['ci'][0]:.1f}-{ratio['ci'][1]:.1f}×)"
    return text


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
            "round CV": _f(m.get("round_cv"), "{:.1%}"),
            f"slow rounds (> {SLOW_ROUND - 1:.0%} over the median)": _f(
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


def deployment_targets(models: dict, unavailable: dict) -> list:
    """The release in other runtimes (export.targets), with parity, and why a target is missing."""
    rows = [
        {
            "model": n,
            "target": m.get("target"),
            "runtime": m.get("runtime"),
            "status": m.get("status"),
            "top-1 %": finite_number(m.get("top1")),
            "p50 ms": finite_number(m.get("p50_ms")),
            "MB": finite_number(m.get("size_mb")),
            "parity vs": (m.get("parity") or {}).get("reference"),
            "agreement": finite_number((m.get("parity") or {}).get("top1_agreement")),
            "reason": "–",
        }
        for n, m in models.items()
        if m.get("role") == "release target"
    ]
    rows += [
        {"model": n, "target": u.get("target"), "status": "unavailable", "reason": u.get("reason")}
        for n, u in (unavailable or {}).items()
    ]
    if not rows:
        return []
    return [
        ("h2", "Deployment targets"),
        ("table", pd.DataFrame(rows)),
        (
            "p",
            "Each target is checked against the model it came from on the whole test split "
            "(`export.targets`); an unavailable target names the exact reason.",
        ),
    ]


def _gate_line(checks: dict, *names: str) -> tuple[bool, str]:
    """(passed, criterion text) of the gate checks with these names; fails when none was run."""
    found = [checks[n] for n in names if n in checks]
    if not found:
        return False, "gate not run"
    text = "; ".join(
        f"gate: {CHECK_NAMES.get(c.get('name'), c.get('name'))} "
        f"{OPS.get(c.get('op'), c.get('op'))} {c.get('threshold')} {c.get('unit', '')}"
        for c in found
    )
    return all(c.get("passed") for c in found), text


def _runtime_line(inputs: dict, rel: str, m: dict) -> tuple:
    """The release file's opset (read by the report stage), its ops, the QAT int8 kernel count."""
    opset = (inputs["models"].get(rel) or {}).get("opset")  # recorded by the benchmark
    kernels = (inputs["qat"].get(rel) or {}).get("kernels")
    want = (inputs["params"].get("export") or {}).get("opset")
    if isinstance(kernels, dict):
        ktext = (
            f"{kernels.get('int8_convs')} int8 / {kernels.get('float_convs')} float convs after "
            "onnxruntime optimization"
        )
    else:
        ktext = "no INT8 kernel report for this model"
    ok = opset is not None and (
        not isinstance(kernels, dict) or bool(kernels.get("all_convs_int8"))
    )
    ops = ", ".join(m.get("onnx_ops") or []) or "–"
    return (
        "runtime / opset",
        ok,
        f"opset {opset if opset is not None else 'unreadable'}, onnxruntime "
        f"{inputs['hardware'].get('onnxruntime', '?')}; ops: {ops}; {ktext}",
        f"opset readable (export.opset {want}); every conv int8 when quantized",
    )


def _stability_line(inputs: dict, rel: str) -> tuple:
    """Export parity of the FP32 model behind the release, and QAT PyTorch-vs-ONNX top-1."""
    parity, qat = inputs["export"].get(base_model(rel)), inputs["qat"].get(rel)
    found, text = [x for x in (parity, qat) if isinstance(x, dict)], []
    if isinstance(parity, dict):
        text.append(
            f"FP32 `{base_model(rel)}` export: "
            f"max |Δlogit| {_f(parity.get('max_abs_diff'), '{:.2e}')}, "
            f"top-1 agreement {_f(parity.get('top1_agreement'), '{:.4f}')}"
        )
    if isinstance(qat, dict):
        text.append(
            f"QAT PyTorch vs ONNX: {_f(qat.get('top1_diff_pp'), '{:+.3f}')} pp, "
            f"same class on {_f(qat.get('agreement'), '{:.2%}')} of the test images"
        )
    return (
        "numerical stability",
        bool(found) and all(x.get("passed") for x in found),
        "; ".join(text) or "no export parity report",
        "export / QAT parity checks passed",
    )


def checklist(inputs: dict) -> list:
    """Deployment checklist for the release model: each line ✓/✗ with its number (missing: ✗)."""
    models, s = inputs["models"], gate_settings(inputs)
    rel, ref, checks = s["release"], s["reference"], s["checks"]
    m, r = models.get(rel), models.get(ref, {})
    if not m:
        return [
            ("h2", "Deployment checklist"),
            ("p", "Not run: no release model with benchmark results."),
        ]
    lines = [
        (
            "size",
            *_gate_line(checks, "size_ratio", "size_mb"),
            f"{_f(m.get('size_mb'), '{:.2f}', ' MB')}, "
            f"{_f(_ratio(m.get('size_mb'), r.get('size_mb')), '{:.3f}', '×')} of `{ref}`",
        ),
        (
            "latency",
            *_gate_line(checks, "latency_speedup"),
            f"p50 {_f(m.get('p50_ms'), '{:.3f}')} ms, p99 {_f(m.get('p99_ms'), '{:.3f}')} ms, "
            f"{_speedup_text(speedup(models, ref, rel))} faster than `{ref}`",
        ),
        (
            "accuracy",
            *_gate_line(checks, "accuracy_drop_pp"),
            f"top-1 {_f(m.get('top1'), '{:.2f}', '%')} "
            f"({_f(_diff(m.get('top1'), r.get('top1')), '{:+.2f}')} pp vs `{ref}`)",
        ),
    ]
    lines = [(name, ok, value, crit) for name, ok, crit, value in lines]
    peak, ref_peak = finite_number(m.get("peak_rss_mb")), finite_number(r.get("peak_rss_mb"))
    lines.append(
        (
            "peak memory",
            peak is not None and peak <= (ref_peak or math.inf),
            f"{_f(peak, '{:.0f}', ' MB')} peak RSS (onnxruntime alone "
            f"{_f(m.get('runtime_rss_mb'), '{:.0f}', ' MB')})",
            f"≤ `{ref}`'s {_f(ref_peak, '{:.0f}', ' MB')}",
        )
    )
    lines += [_runtime_line(inputs, rel, m), _stability_line(inputs, rel)]
    df = pd.DataFrame(
        [{"": _mark(ok), "check": k, "measured": v, "criterion": c} for k, ok, v, c in lines]
    )
    return [("h2", f"Deployment checklist: `{rel}`"), ("table", df)]


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
                "top-1 mean ± std %": _pm(summary.get("mean"), summary.get("std")),
                "per seed %": ", ".join(_f(r.get("top1", {}).get(name), "{:.2f}") for r in runs),
                "drop vs ref, mean ± std pp": _pm(drop.get("mean"), drop.get("std"))
                if drop
                else "–",
                "drop 95% CI (t, across seeds)": _interval(drop.get("ci_low"), drop.get("ci_high"))
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


def _pm(mean, std) -> str:
    mean, std = finite_number(mean), finite_number(std)
    return "–" if mean is None else f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def pruning(prune) -> list:
    """Params / MACs before and after, top-1 through the pruning steps, what the method buys."""
    blocks = [("h2", "Pruning")]
    if not isinstance(prune, dict):
        return blocks + [("p", "Not run (no reports/prune/metrics.json).")]
    rows = [
        {
            "": k,
            "teacher": finite_number((prune.get(key) or {}).get("teacher")),
            "pruned": finite_number((prune.get(key) or {}).get("pruned")),
            "pruned / teacher": _ratio(
                (prune.get(key) or {}).get("pruned"), (prune.get(key) or {}).get("teacher")
            ),
        }
        for k, key in (
            ("params", "params"),
            ("MACs", "macs"),
            ("non-zero params", "nonzero_params"),
        )
        if isinstance(prune.get(key), dict)
    ]
    t = prune.get("top1_test") if isinstance(prune.get("top1_test"), dict) else {}
    steps = [
        f"{label} {_f(t.get(k), '{:.2f}', '%')}"
        for label, k in (
            ("before", "before"),
            ("after sparsity training", "after_sparsity"),
            ("after channel removal", "after_removal"),
            ("after fine-tune", "after_finetune"),
        )
        if k in t
    ]
    method = prune.get("method")
    blocks.append(("p", f"Method `{method}`, ratio {prune.get('ratio')}."))
    blocks += [("table", pd.DataFrame(rows))] if rows else []
    blocks += [("p", "Test top-1: " + " → ".join(steps) + ".")] if steps else []
    if method == "magnitude":
        blocks.append(
            (
                "p",
                "**Magnitude pruning is unstructured: it reduces non-zero weights, not latency "
                "or the dense file size.** The ONNX file keeps every (zeroed) weight and "
                "onnxruntime runs dense kernels.",
            )
        )
    else:
        blocks.append(
            (
                "p",
                f"Whole channels are removed ({_f(prune.get('channels_kept'), '{:.0%}')} kept), "
                "so the dense model itself is smaller and faster.",
            )
        )
    return blocks + [("img", "channels.png", "Channels kept per layer")]


def lowrank_vs_pruning(lowrank, prune, models: dict) -> list:
    """SVD factorization against channel pruning at (about) the same parameter count."""
    if not isinstance(lowrank, dict):
        return []  # runs from before the lowrank stage
    blocks = [("h2", "Low-rank factorization vs channel pruning")]
    prune = prune if isinstance(prune, dict) else {}
    # the prune stage's own counts stand in when lowrank had a fixed params_ratio (no "pruned" key)
    params = {"pruned": (prune.get("params") or {}).get("pruned"), **(lowrank.get("params") or {})}
    macs = {"pruned": (prune.get("macs") or {}).get("pruned"), **(lowrank.get("macs") or {})}
    prune_top1 = prune.get("top1_test") or {}
    top1 = lowrank.get("top1_test") or {}
    rows = []
    for label, name, technique, test_top1 in (
        ("pruned FP32", "pruned", "pruned", prune_top1.get("after_finetune")),
        ("pruned INT8 (QAT)", "pruned_qat_int8", "pruned", None),
        ("pruned INT8 (PTQ)", "pruned_ptq_int8", "pruned", None),
        ("low-rank FP32", "lowrank", "lowrank", top1.get("after_finetune")),
        ("low-rank INT8 (PTQ)", "lowrank_ptq_int8", "lowrank", None),
    ):
        m = models.get(name) if isinstance(models.get(name), dict) else {}
        if not m and "INT8" in label:
            continue  # INT8 rows as benchmarked; the FP32 rows fall back to the stage metrics
        rows.append(
            {
                "model": label,
                "params": finite_number(params.get(technique)),
                "MACs": finite_number(macs.get(technique)),
                "test top-1 %": finite_number(m.get("top1", test_top1)),
                "p50 ms": finite_number(m.get("p50_ms")),
                "MB": finite_number(m.get("size_mb")),
            }
        )
    blocks.append(
        (
            "p",
            "SVD of the conv / linear weights it shrinks "
            f"(ranks multiples of {lowrank.get('round_to')}, one energy threshold for all layers) "
            f"to {_f(lowrank.get('params_ratio_target'), '{:.1%}')} "
            f"of the teacher's parameters, then fine-tuning. Test top-1: "
            f"{_f(top1.get('before'), '{:.2f}', '%')} → "
            f"{_f(top1.get('after_factorization'), '{:.2f}', '%')} after factorization → "
            f"{_f(top1.get('after_finetune'), '{:.2f}', '%')} after fine-tuning.",
        )
    )
    blocks.append(("table", pd.DataFrame(rows)))
    fp32 = {r["model"].split()[0]: r for r in rows if "FP32" in r["model"]}
    a, b = fp32.get("pruned", {}), fp32.get("low-rank", {})
    if all(
        isinstance(x, (int, float))
        for x in (a.get("p50 ms"), b.get("p50 ms"), a.get("test top-1 %"), b.get("test top-1 %"))
    ):
        gain, ms = b["test top-1 %"] - a["test top-1 %"], (a["p50 ms"], b["p50 ms"])
        lead = {
            "top-1": "low-rank" if gain > 0 else "pruned" if gain < 0 else None,
            "latency": "low-rank" if ms[1] < ms[0] else "pruned" if ms[0] < ms[1] else None,
        }
        winners = set(lead.values()) - {None}
        verdict = (
            "neither wins: they tie"
            if not winners
            else f"{winners.pop()} wins"
            if len(winners) == 1
            else (
                f"neither wins outright: {lead['top-1']} is more accurate, "
                f"{lead['latency']} is faster"
            )
        )
        size = (
            f"{a['params']:,.0f} vs {b['params']:,.0f} parameters (pruned vs low-rank)"
            if finite_number(a.get("params")) and finite_number(b.get("params"))
            else "about the same parameter count"
        )
        blocks.append(
            (
                "p",
                f"At {size}, {verdict}: FP32 p50 {ms[0]:.3f} ms pruned vs {ms[1]:.3f} ms "
                f"low-rank, top-1 {gain:+.2f} pp (low-rank − pruned)."
                + (
                    " A factorized layer runs as two convolutions: a second operator's overhead "
                    "where pruning just shrinks one."
                    if lead["latency"] == "pruned"
                    else ""
                ),
            )
        )
    return blocks


def distillation(d) -> list:
    """The student with and without the teacher, and an honest sentence about the difference."""
    blocks = [("h2", "Distillation")]
    if not isinstance(d, dict):
        return blocks + [("p", "Not run (no reports/distill/metrics.json).")]
    kd, no_kd, gain = (
        finite_number(d.get(k)) for k in ("student_top1_kd", "student_top1_no_kd", "kd_gain_pp")
    )
    text = (
        f"Student test top-1 with KD {_f(kd, '{:.2f}', '%')} "
        f"(α {d.get('alpha')}, T {d.get('temperature')}, "
        f"feature weight {d.get('feature_weight')}); "
        f"{_f(d.get('macs_vs_teacher'), '{:.1%}')} of the teacher's MACs, "
        f"{_f(d.get('params_vs_teacher'), '{:.1%}')} of its params."
    )
    ci = d.get("kd_gain_ci_pp")
    if not (
        isinstance(ci, list) and len(ci) == 2 and all(finite_number(v) is not None for v in ci)
    ):
        ci = None  # older metrics, or a run without the baseline
    ci_text = (
        f"; 95% paired CI [{ci[0]:+.2f}, {ci[1]:+.2f}] pp, McNemar p = "
        f"{_f(d.get('kd_mcnemar_p'), '{:.2g}')}"
        if ci
        else ""
    )
    if gain is None:
        verdict = "No baseline without the teacher was trained (distill.train_baseline is false)."
    elif ci and ci[0] <= 0.0 <= ci[1]:
        verdict = (
            f"KD vs the same student trained without the teacher ({_f(no_kd, '{:.2f}', '%')}): "
            f"{gain:+.2f} pp{ci_text}: the interval includes 0, so on this test split KD is "
            f"not distinguishable from training on the labels alone."
        )
    elif gain > 0:
        verdict = (
            f"KD helped: +{gain:.2f} pp over the same student trained without the teacher "
            f"({_f(no_kd, '{:.2f}', '%')}{ci_text})."
        )
    else:
        verdict = (
            f"**KD did not help here**: the same student trained without the teacher scored "
            f"{_f(no_kd, '{:.2f}', '%')} ({gain:+.2f} pp for KD{ci_text}). On an easy dataset "
            f"the labels alone are enough; distillation pays off when the student is too small "
            f"to learn the task from labels."
        )
    return blocks + [("p", text), ("p", verdict)]


def quantization(qat: dict) -> list:
    """QAT: PyTorch vs exported ONNX top-1 and the int8 kernel count."""
    blocks = [("h2", "Quantization-aware training")]
    rows = []
    for name, m in qat.items():
        if isinstance(m, dict):
            k = m.get("kernels") if isinstance(m.get("kernels"), dict) else {}
            rows.append(
                {
                    "model": name,
                    "PyTorch top-1": finite_number(m.get("torch_top1")),
                    "ONNX top-1": finite_number(m.get("onnx_top1")),
                    "Δ pp": finite_number(m.get("top1_diff_pp")),
                    "same class": _f(m.get("agreement"), "{:.2%}"),
                    "int8 convs": k.get("int8_convs"),
                    "float convs": k.get("float_convs"),
                    "all convs int8": _mark(k.get("all_convs_int8")),
                    "passed": _mark(m.get("passed")),
                }
            )
    if not rows:
        return blocks + [("p", "Not run (no reports/qat_*/metrics.json).")]
    return blocks + [
        ("table", pd.DataFrame(rows)),
        (
            "p",
            "Kernels are counted after onnxruntime's graph optimization: a QDQ `Conv` that "
            "becomes `QLinearConv` runs in int8; one left as `Conv` runs in float.",
        ),
    ]


def teacher_origin(teacher) -> list:
    """Where the teacher came from: trained here, or imported (file, format, sha256, top-1)."""
    blocks = [("h2", "Teacher origin")]
    origin = teacher.get("origin") if isinstance(teacher, dict) else None
    if not isinstance(origin, dict):
        return blocks + [("p", "Trained from scratch by this pipeline (`teacher.init: null`).")]
    as_imported = origin.get("top1_as_imported") or {}
    adapted = origin.get("top1_after_adaptation") or {}
    rows = [
        {"": "file", "value": f"`{origin.get('file')}`"},
        {"": "format / family", "value": f"{origin.get('format')} / {origin.get('family')}"},
        {"": "sha256", "value": f"`{origin.get('sha256')}`"},
        {"": "tracked by DVC", "value": _mark(origin.get("tracked_by_dvc"))},
        {
            "": "classes in the file",
            "value": str(origin.get("classes_in_file"))
            + (" (classifier replaced)" if origin.get("head_replaced") else ""),
        },
        {
            "": "top-1 as imported (val / test %)",
            "value": (
                f"{_f(as_imported.get('val'), '{:.2f}')} / {_f(as_imported.get('test'), '{:.2f}')}"
            ),
        },
        {
            "": "top-1 after adaptation (val / test %)",
            "value": (
                f"{_f(adapted.get('val'), '{:.2f}')} / {_f(adapted.get('test'), '{:.2f}')}"
                if adapted
                else "not adapted (`teacher.epochs: 0`)"
            ),
        },
    ]
    return blocks + [("table", pd.DataFrame(rows))]


def training(teacher, curves: dict) -> list:
    """The teacher's validation curve and whether it plateaued; every run's curve as a figure."""
    blocks = [("h2", "Training curves")]
    curve = (
        [finite_number(v) for v in (teacher or {}).get("val_top1_curve") or []]
        if isinstance(teacher, dict)
        else []
    )
    curve = [v for v in curve if v is not None] or [v for _, v in curves.get("teacher", [])]
    if curve:
        tail = curve[-PLATEAU_EPOCHS:]
        spread = max(tail) - min(tail)
        if len(curve) < PLATEAU_EPOCHS:
            verdict = f"Too few epochs ({len(curve)}) to tell whether it plateaued."
        elif spread <= PLATEAU_PP:
            verdict = f"It plateaued: the last {PLATEAU_EPOCHS} epochs lie within {spread:.2f} pp."
        else:
            verdict = (
                f"It had not plateaued: the last {PLATEAU_EPOCHS} epochs span {spread:.2f} pp "
                f"(> {PLATEAU_PP} pp); more epochs (teacher.epochs) may still help."
            )
        blocks.append(
            (
                "p",
                f"Teacher validation top-1 per epoch: {', '.join(f'{v:.1f}' for v in curve)}. "
                + verdict,
            )
        )
    else:
        blocks.append(("p", "Teacher: not run (no reports/teacher/summary.json)."))
    if curves:
        blocks.append(
            ("img", "training_curves.png", "Validation top-1 per epoch: " + ", ".join(curves))
        )
    return blocks


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
            "of the limit": _f(m.get("peak_fraction"), "{:.0%}"),
            "95% CI": _interval(*(m.get("peak_fraction_ci") or [None, None]), "{:.2f}"),
            f"p50 ms, {m.get('all_cores', 'all')} cores": finite_number(m.get("p50_ms_all_cores")),
        }
        for n, m in models.items()
        if finite_number(m.get("macs"))
    ]
    text = (
        f"Peak from a conv micro-benchmark on this CPU ({roofline.get('threads')} thread, best of "
        f"{len(roofline.get('shapes') or [])} conv chains): "
        f"**{_f(roofline.get('fp32_gmacs'), '{:.1f}')} GMAC/s FP32, "
        f"{_f(roofline.get('int8_gmacs'), '{:.1f}')} GMAC/s INT8** "
        f'({_f(roofline.get("int8_over_fp32"), "{:.2f}")}× for INT8). "Of the limit" is the floor '
        "latency at that peak over the measured p50. Small models stay far below 100%: "
        "per-op costs (dispatch, re-quantization, pooling, the classifier) do not shrink with the "
        "MAC count, so past a point fewer MACs buy less latency. A model above 100% runs kernels "
        "the micro-benchmark does not (e.g. fused stem convs)."
    )
    rel = models.get(release or "", {})
    if finite_number(rel.get("peak_fraction")) is not None:
        text += (
            f" The release `{release}` does {_f(rel.get('macs'), '{:,.0f}')} MACs in "
            f"{_f(rel.get('p50_ms'), '{:.3f}')} ms: "
            f"{_f(rel.get('peak_fraction'), '{:.0%}')} of the {rel.get('peak_kind')} limit."
        )
    return blocks + [("p", text), ("table", pd.DataFrame(rows))]


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


def params_section(text: str) -> list:
    """params.yaml as it was when the report was written."""
    return [("h2", "Parameters (params.yaml)"), ("pre", text or "params.yaml not found", "yaml")]
