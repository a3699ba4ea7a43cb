"""The report's sections on the release: the gate's verdict, and the deployment checklist.

Each section function takes the loaded inputs and returns blocks (see render.py). The other
sections are in baselines.py (every model against the reference and its peers), methods.py (the
compression methods) and measured.py (timing, noise, hardware). Numbers are shown as measured; a
missing input gives its section a plain "not run" line and a missing number prints as "–" and
fails its checklist line (fail closed, like the gate).
"""

import math
import re

import pandas as pd

from resnet_slim import registry
from resnet_slim.gate.gate import accuracy_sentence, speedup_sentence
from resnet_slim.gate.metrics import speedup
from resnet_slim.io import finite_number
from resnet_slim.report.cells import difference, interval, mark, num, ratio_of, speedup_text
from resnet_slim.report.plots import feasible_region

QUANT_SUFFIX = re.compile(rf"_({'|'.join(registry.INT8_SUFFIXES)})$")
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


def headline(inputs: dict) -> list:
    """Release model, gate verdict with every check, why the release was chosen."""
    gate, s = inputs["gate"], gate_settings(inputs)
    if not isinstance(gate, dict):
        return [("h1", "resnet-slim report"), ("p", "**Gate: not run** (no reports/gate.json).")]
    verdict = "✓ PASSED" if gate.get("passed") else "✗ FAILED"
    enforce = (
        "" if gate.get("enforce", True) else " (gate.enforce is false: recorded, not enforced)"
    )
    # a model that failed is never named the release: it is the gate's best candidate, failed
    title = (
        f"resnet-slim report: release `{s['release']}`"
        if gate.get("passed") is True
        else f"resnet-slim report: no release (the gate failed `{s['release']}`)"
    )
    blocks = [
        ("h1", title),
        (
            "p",
            f"**Gate {verdict}**{enforce}: `{s['release']}` against the FP32 `{s['reference']}`.",
        ),
        ("ul", [_check_item(c) for c in s["checks"].values()]),
    ]
    blocks += _accuracy_support(s["checks"].get("accuracy_drop_pp"))
    blocks += _timing_support(s["checks"].get("latency_speedup"))
    if isinstance(gate.get("selection"), dict):
        blocks += _selection(gate["selection"])
    return blocks


def _check_item(c: dict) -> str:
    """One gate check as a list item: ✓/✗, what was measured against which threshold, why not."""
    return (
        f"{mark(c.get('passed'))} {CHECK_NAMES.get(c.get('name'), c.get('name'))} "
        f"(`{c.get('name')}`): {num(c.get('measured'))} {c.get('unit', '')} "
        f"{OPS.get(c.get('op'), c.get('op'))} {c.get('threshold')} {c.get('unit', '')}"
        + (f" — {c['reason']}" if c.get("reason") else "")
        + (
            " (negative: more accurate than the reference)"
            if c.get("name") == "accuracy_drop_pp" and (finite_number(c.get("measured")) or 0) < 0
            else ""
        )
    )


def _accuracy_support(accuracy) -> list:
    """What the data support about the drop, and a warning when the test split cannot decide."""
    if not (isinstance(accuracy, dict) and accuracy.get("statistic")):
        return []  # a gate.json without the statistics: nothing to say beyond the check
    gated_on = (
        "the upper end of the drop's confidence interval"
        if accuracy["statistic"] == "upper_ci"
        else "the point drop"
    )
    blocks = [
        (
            "p",
            f"**What the data support:** {accuracy_sentence(accuracy)} The gate "
            f"judged {gated_on} (`gate.acc_drop_statistic: "
            f"{accuracy['statistic']}`).",
        )
    ]
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
    return blocks


def _timing_support(latency) -> list:
    """What the timing supports about the speed-up, and a warning when the host was too noisy."""
    if not (isinstance(latency, dict) and latency.get("statistic")):
        return []  # a gate.json without the statistics: nothing to say beyond the check
    gated_on = (
        "the lower end of the speed-up's confidence interval"
        if latency["statistic"] == "lower_ci"
        else "the point speed-up"
    )
    blocks = [
        (
            "p",
            f"**What the timing supports:** {speedup_sentence(latency)} The gate judged "
            f"{gated_on} (`gate.speedup_statistic: {latency['statistic']}`).",
        )
    ]
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
    return blocks


def _selection(sel: dict) -> list:
    """Why `release: auto` chose this model, and every candidate it weighed."""
    blocks = [("p", f"Why this model: {sel.get('why')}.")]
    cands = [
        {
            "candidate": c.get("model"),
            "passed": mark(c.get("passed")),
            "p50 ms": finite_number(c.get("p50_ms")),
            "speed-up ×": finite_number(c.get("speedup")),
            "95% CI": interval(*(c.get("speedup_ci") or [None, None]), "{:.2f}"),
            "failed": "; ".join(c.get("failed") or []) or "–",
        }
        for c in sel.get("candidates") or []
    ]
    if cands:
        blocks.append(("table", pd.DataFrame(cands)))
    return blocks


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
            f"max |Δlogit| {num(parity.get('max_abs_diff'), '{:.2e}')}, "
            f"top-1 agreement {num(parity.get('top1_agreement'), '{:.4f}')}"
        )
    if isinstance(qat, dict):
        text.append(
            f"QAT PyTorch vs ONNX: {num(qat.get('top1_diff_pp'), '{:+.3f}')} pp, "
            f"same class on {num(qat.get('agreement'), '{:.2%}')} of the test images"
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
            f"{num(m.get('size_mb'), '{:.2f}', ' MB')}, "
            f"{num(ratio_of(m.get('size_mb'), r.get('size_mb')), '{:.3f}', '×')} of `{ref}`",
        ),
        (
            "latency",
            *_gate_line(checks, "latency_speedup"),
            f"p50 {num(m.get('p50_ms'), '{:.3f}')} ms, p99 {num(m.get('p99_ms'), '{:.3f}')} ms, "
            f"{speedup_text(speedup(models, ref, rel))} faster than `{ref}`",
        ),
        (
            "accuracy",
            *_gate_line(checks, "accuracy_drop_pp"),
            f"top-1 {num(m.get('top1'), '{:.2f}', '%')} "
            f"({num(difference(m.get('top1'), r.get('top1')), '{:+.2f}')} pp vs `{ref}`)",
        ),
    ]
    lines = [(name, ok, value, crit) for name, ok, crit, value in lines]
    peak, ref_peak = finite_number(m.get("peak_rss_mb")), finite_number(r.get("peak_rss_mb"))
    lines.append(
        (
            "peak memory",
            peak is not None and peak <= (ref_peak or math.inf),
            f"{num(peak, '{:.0f}', ' MB')} peak RSS (onnxruntime alone "
            f"{num(m.get('runtime_rss_mb'), '{:.0f}', ' MB')})",
            f"≤ `{ref}`'s {num(ref_peak, '{:.0f}', ' MB')}",
        )
    )
    lines += [_runtime_line(inputs, rel, m), _stability_line(inputs, rel)]
    df = pd.DataFrame(
        [{"": mark(ok), "check": k, "measured": v, "criterion": c} for k, ok, v, c in lines]
    )
    return [("h2", f"Deployment checklist: `{rel}`"), ("table", df)]


def params_section(text: str) -> list:
    """params.yaml as it was when the report was written."""
    return [("h2", "Parameters (params.yaml)"), ("pre", text or "params.yaml not found", "yaml")]
