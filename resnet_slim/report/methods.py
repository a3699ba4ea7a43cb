"""The report's sections on the compression methods: channel pruning, low-rank factorization
against it, distillation, quantization-aware training, and the training curves behind them.
Blocks as in sections.py.
"""

import pandas as pd

from resnet_slim.io import finite_number
from resnet_slim.report.cells import mark, num, ratio_of

PLATEAU_EPOCHS, PLATEAU_PP = 3, 0.5  # "plateaued": the last 3 epochs lie within 0.5 pp
# (row label, benchmark model, technique, which stage top-1 stands in without a benchmark row)
LOWRANK_ROWS = (
    ("pruned FP32", "pruned", "pruned", "prune"),
    ("pruned INT8 (QAT)", "pruned_qat_int8", "pruned", None),
    ("pruned INT8 (PTQ)", "pruned_ptq_int8", "pruned", None),
    ("low-rank FP32", "lowrank", "lowrank", "lowrank"),
    ("low-rank INT8 (PTQ)", "lowrank_ptq_int8", "lowrank", None),
)


def pruning(prune) -> list:
    """Params / MACs before and after, top-1 through the pruning steps, what the method buys."""
    blocks = [("h2", "Pruning")]
    if not isinstance(prune, dict):
        return blocks + [("p", "Not run (no reports/prune/metrics.json).")]
    rows, steps = _pruning_rows(prune), _pruning_steps(prune)
    method = prune.get("method")
    blocks.append(("p", f"Method `{method}`, ratio {prune.get('ratio')}."))
    blocks += [("table", pd.DataFrame(rows))] if rows else []
    blocks += [("p", "Test top-1: " + " → ".join(steps) + ".")] if steps else []
    blocks.append(_what_pruning_buys(prune))
    blocks += _latency_plan(prune.get("latency_plan"))
    return blocks + [("img", "channels.png", "Channels kept per layer")]


def _latency_plan(plan, lead: str = "Pruned to a latency budget") -> list:
    """prune.method latency (or distill.student.fit_to_budget): the budget, what the plan
    predicts, and what became of each block."""
    if not isinstance(plan, dict) or not isinstance(plan.get("blocks"), dict):
        return []
    teacher = plan.get("teacher_predicted_ms") or {}
    blocks = plan["blocks"]
    removed = [n for n, b in blocks.items() if b.get("width") is None]
    narrowed = [
        f"{n} {max(map(int, b['ms']))}→{b['width']}"
        for n, b in blocks.items()
        if b.get("width") is not None and b.get("ms") and b["width"] < max(map(int, b["ms"]))
    ]
    measured = (plan.get("teacher_measured_ms") or {}).get("fp32")
    reference = (
        f"{num(measured, '{:.3f}')} ms measured ({num(teacher.get('fp32'), '{:.3f}')} predicted)"
        if finite_number(measured) is not None
        else f"{num(teacher.get('fp32'), '{:.3f}')} ms predicted"
    )
    text = (
        f"{lead} ({plan.get('structure')}): teacher FP32 {reference}, INT8 "
        f"{num(teacher.get('int8'), '{:.3f}')} ms predicted; budget FP32 / {plan.get('speedup')} "
        f"= {num(plan.get('budget_int8_ms'), '{:.3f}')} ms INT8, the plan predicts "
        f"{num(plan.get('pruned_predicted_int8_ms'), '{:.3f}')} ms. "
        f"{len(removed)} of {len(blocks)} residual blocks removed"
        + (f" ({', '.join(removed)})" if removed else "")
        + f"; {len(narrowed)} narrowed"
        + (f" ({', '.join(narrowed)} inner channels)" if narrowed else "")
        + ". Each choice was the least validation-loss increase per millisecond saved"
        + (
            f"; then, for the size target of {plan['max_params']:,} parameters "
            f"({plan['pruned_params']:,} kept), per parameter saved."
            if all(isinstance(plan.get(k), int) for k in ("max_params", "pruned_params"))
            else "."
        )
    )
    return [("p", text)]


def _pruning_rows(prune: dict) -> list[dict]:
    """Params, MACs and non-zero params of the teacher and the pruned model, where recorded."""
    return [
        {
            "": k,
            "teacher": finite_number((prune.get(key) or {}).get("teacher")),
            "pruned": finite_number((prune.get(key) or {}).get("pruned")),
            "pruned / teacher": ratio_of(
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


def _pruning_steps(prune: dict) -> list[str]:
    """Test top-1 after each pruning step the stage recorded, in order."""
    t = prune.get("top1_test") if isinstance(prune.get("top1_test"), dict) else {}
    return [
        f"{label} {num(t.get(k), '{:.2f}', '%')}"
        for label, k in (
            ("before", "before"),
            ("after sparsity training", "after_sparsity"),
            ("after channel removal", "after_removal"),
            ("after fine-tune", "after_finetune"),
        )
        if k in t
    ]


def _what_pruning_buys(prune: dict) -> tuple:
    """Magnitude pruning saves no latency or file size; channel pruning shrinks the dense model."""
    if prune.get("method") == "latency":
        return (
            "p",
            "Whole residual blocks and inner channels are removed where the measured latency "
            "table says they cost time, at widths onnxruntime's fast INT8 kernels run.",
        )
    if prune.get("method") == "magnitude":
        return (
            "p",
            "**Magnitude pruning is unstructured: it reduces non-zero weights, not latency "
            "or the dense file size.** The ONNX file keeps every (zeroed) weight and "
            "onnxruntime runs dense kernels.",
        )
    return (
        "p",
        f"Whole channels are removed ({num(prune.get('channels_kept'), '{:.0%}')} kept), "
        "so the dense model itself is smaller and faster.",
    )


def lowrank_vs_pruning(lowrank, prune, models: dict) -> list:
    """SVD factorization against channel pruning at (about) the same parameter count."""
    if not isinstance(lowrank, dict):
        return []  # runs from before the lowrank stage
    prune = prune if isinstance(prune, dict) else {}
    rows = _lowrank_rows(lowrank, prune, models)
    top1 = lowrank.get("top1_test") or {}
    blocks = [
        ("h2", "Low-rank factorization vs channel pruning"),
        (
            "p",
            "SVD of the conv / linear weights it shrinks "
            f"(ranks multiples of {lowrank.get('round_to')}, one energy threshold for all layers) "
            f"to {num(lowrank.get('params_ratio_target'), '{:.1%}')} "
            f"of the teacher's parameters, then fine-tuning. Test top-1: "
            f"{num(top1.get('before'), '{:.2f}', '%')} → "
            f"{num(top1.get('after_factorization'), '{:.2f}', '%')} after factorization → "
            f"{num(top1.get('after_finetune'), '{:.2f}', '%')} after fine-tuning.",
        ),
        ("table", pd.DataFrame(rows)),
    ]
    return blocks + _lowrank_verdict(rows)


def _lowrank_rows(lowrank: dict, prune: dict, models: dict) -> list[dict]:
    """The pruned and low-rank models, FP32 and INT8: params, MACs, top-1, p50, size.

    INT8 rows appear as benchmarked; the FP32 rows fall back to the stage metrics."""
    # the prune stage's own counts stand in when lowrank had a fixed params_ratio (no "pruned" key)
    params = {"pruned": (prune.get("params") or {}).get("pruned"), **(lowrank.get("params") or {})}
    macs = {"pruned": (prune.get("macs") or {}).get("pruned"), **(lowrank.get("macs") or {})}
    stage_top1 = {
        "prune": (prune.get("top1_test") or {}).get("after_finetune"),
        "lowrank": (lowrank.get("top1_test") or {}).get("after_finetune"),
    }
    rows = []
    for label, name, technique, stage in LOWRANK_ROWS:
        m = models.get(name) if isinstance(models.get(name), dict) else {}
        if not m and "INT8" in label:
            continue
        rows.append(
            {
                "model": label,
                "params": finite_number(params.get(technique)),
                "MACs": finite_number(macs.get(technique)),
                "test top-1 %": finite_number(m.get("top1", stage_top1.get(stage))),
                "p50 ms": finite_number(m.get("p50_ms")),
                "MB": finite_number(m.get("size_mb")),
            }
        )
    return rows


def _lowrank_verdict(rows: list[dict]) -> list:
    """Which FP32 model wins on top-1 and on latency; nothing when either lacks a number."""
    fp32 = {r["model"].split()[0]: r for r in rows if "FP32" in r["model"]}
    a, b = fp32.get("pruned", {}), fp32.get("low-rank", {})
    if not all(
        isinstance(x, (int, float))
        for x in (a.get("p50 ms"), b.get("p50 ms"), a.get("test top-1 %"), b.get("test top-1 %"))
    ):
        return []
    gain, ms = b["test top-1 %"] - a["test top-1 %"], (a["p50 ms"], b["p50 ms"])
    lead = {
        "top-1": "low-rank" if gain > 0 else "pruned" if gain < 0 else None,
        "latency": "low-rank" if ms[1] < ms[0] else "pruned" if ms[0] < ms[1] else None,
    }
    size = (
        f"{a['params']:,.0f} vs {b['params']:,.0f} parameters (pruned vs low-rank)"
        if finite_number(a.get("params")) and finite_number(b.get("params"))
        else "about the same parameter count"
    )
    return [
        (
            "p",
            f"At {size}, {_who_wins(lead)}: FP32 p50 {ms[0]:.3f} ms pruned vs {ms[1]:.3f} ms "
            f"low-rank, top-1 {gain:+.2f} pp (low-rank − pruned)."
            + (
                " A factorized layer runs as two convolutions: a second operator's overhead "
                "where pruning just shrinks one."
                if lead["latency"] == "pruned"
                else ""
            ),
        )
    ]


def _who_wins(lead: dict) -> str:
    """ "pruned wins", "neither wins: they tie", or each one's lead when they split."""
    winners = set(lead.values()) - {None}
    if not winners:
        return "neither wins: they tie"
    if len(winners) == 1:
        return f"{winners.pop()} wins"
    return f"neither wins outright: {lead['top-1']} is more accurate, {lead['latency']} is faster"


def distillation(d) -> list:
    """The student with and without the teacher, and an honest sentence about the difference."""
    blocks = [("h2", "Distillation")]
    if not isinstance(d, dict):
        return blocks + [("p", "Not run (no reports/distill/metrics.json).")]
    kd, no_kd, gain = (
        finite_number(d.get(k)) for k in ("student_top1_kd", "student_top1_no_kd", "kd_gain_pp")
    )
    text = (
        f"Student test top-1 with KD {num(kd, '{:.2f}', '%')} "
        f"(α {d.get('alpha')}, T {d.get('temperature')}, "
        f"feature weight {d.get('feature_weight')}); "
        f"{num(d.get('macs_vs_teacher'), '{:.1%}')} of the teacher's MACs, "
        f"{num(d.get('params_vs_teacher'), '{:.1%}')} of its params."
    )
    ci = d.get("kd_gain_ci_pp")
    if not (
        isinstance(ci, list) and len(ci) == 2 and all(finite_number(v) is not None for v in ci)
    ):
        ci = None  # older metrics, or a run without the baseline
    ci_text = (
        f"; 95% paired CI [{ci[0]:+.2f}, {ci[1]:+.2f}] pp, McNemar p = "
        f"{num(d.get('kd_mcnemar_p'), '{:.2g}')}"
        if ci
        else ""
    )
    if gain is None:
        verdict = "No baseline without the teacher was trained (distill.train_baseline is false)."
    elif ci and ci[0] <= 0.0 <= ci[1]:
        verdict = (
            f"KD vs the same student trained without the teacher ({num(no_kd, '{:.2f}', '%')}): "
            f"{gain:+.2f} pp{ci_text}: the interval includes 0, so on this test split KD is "
            f"not distinguishable from training on the labels alone."
        )
    elif gain > 0:
        verdict = (
            f"KD helped: +{gain:.2f} pp over the same student trained without the teacher "
            f"({num(no_kd, '{:.2f}', '%')}{ci_text})."
        )
    else:
        verdict = (
            f"**KD did not help here**: the same student trained without the teacher scored "
            f"{num(no_kd, '{:.2f}', '%')} ({gain:+.2f} pp for KD{ci_text}). On an easy dataset "
            f"the labels alone are enough; distillation pays off when the student is too small "
            f"to learn the task from labels."
        )
    fitted = _latency_plan(
        d.get("latency_plan"), lead="The student was first fitted to the teacher's latency budget"
    )
    return blocks + [("p", text), ("p", verdict)] + fitted


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
                    "same class": num(m.get("agreement"), "{:.2%}"),
                    "int8 convs": k.get("int8_convs"),
                    "float convs": k.get("float_convs"),
                    "all convs int8": mark(k.get("all_convs_int8")),
                    "passed": mark(m.get("passed")),
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
