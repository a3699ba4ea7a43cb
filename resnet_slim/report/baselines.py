"""The report's sections on the models: every benchmarked model against the reference, the release
against its baselines (the FP32 teacher and the INT8 builds a user would pick instead), the
release in other runtimes, and where the teacher came from. Blocks as in sections.py.
"""

import pandas as pd

from resnet_slim.gate.metrics import best_peer_int8, speedup
from resnet_slim.io import finite_number
from resnet_slim.report.cells import difference, interval, mark, num, ratio_of, speedup_text
from resnet_slim.report.sections import gate_settings


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
                "95% CI": interval(m.get("top1_ci_low"), m.get("top1_ci_high")),
                "Δ pp vs ref": difference(m.get("top1"), ref.get("top1")),
                "params": finite_number(m.get("params")),
                "file MB": finite_number(m.get("size_mb")),
                "p50 ms": finite_number(m.get("p50_ms")),
                "p99 ms": finite_number(m.get("p99_ms")),
                "speed-up ×": (ratio := speedup(models, reference, name))["ratio"],
                "speed-up 95% CI": interval(*(ratio["ci"] or [None, None]), "{:.2f}"),
                "size × smaller": ratio_of(ref.get("size_mb"), m.get("size_mb")),
                "peak RSS MB": finite_number(m.get("peak_rss_mb")),
                "img/s": finite_number(m.get("throughput_ips")),
                "role": "release" if name == release else "reference" if name == reference else "",
            }
        )
    return pd.DataFrame(rows)


def comparison(inputs: dict) -> list:
    """Every model's row, then the release against the FP32 reference and INT8 baselines."""
    models, s = inputs["models"], gate_settings(inputs)
    ref, rel = s["reference"], s["release"]
    blocks = _every_model(models, ref, rel)
    if rel not in models:
        return blocks + [("p", f"No benchmark row for the release `{rel}`: no ratios.")]
    blocks += _release_vs_baselines(models, ref, rel)
    best = best_peer_int8(models, ref)
    if best is not None:
        blocks.append(_release_vs_teacher_and_peer(models, ref, rel, best))
    return blocks


def _every_model(models: dict, ref: str, rel: str | None) -> list:
    """The table of every model, and how many test images one point of top-1 is."""
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
    return blocks


def _release_vs_baselines(models: dict, ref: str, rel: str) -> list:
    """The release's latency, size and top-1 ratios against the reference and every peer build."""
    peers = [ref] + [n for n in models if n != rel and models[n].get("role") == "peer"]
    peers += [n for n in models if n.endswith("_ptq_int8") and n != rel and "dynamic" not in n]
    m = models[rel]
    rows = [
        {
            "release vs": n,
            "runtime": models[n].get("runtime", "onnxruntime"),
            "latency ×": (ratio := speedup(models, n, rel))["ratio"],
            "95% CI": interval(*(ratio["ci"] or [None, None]), "{:.2f}"),
            "latency × (all cores)": (every := speedup(models, n, rel, all_cores=True))["ratio"],
            "95% CI (all cores)": interval(*(every["ci"] or [None, None]), "{:.2f}"),
            "size × smaller": ratio_of(models[n].get("size_mb"), m.get("size_mb")),
            "Δ top-1 pp": difference(m.get("top1"), models[n].get("top1")),
        }
        for n in dict.fromkeys(peers)
        if n in models
    ]
    return [
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


def _release_vs_teacher_and_peer(models: dict, ref: str, rel: str, best: str) -> tuple:
    """One paragraph: the release against the FP32 teacher and against the fastest peer INT8."""
    m, r, b = models[rel], models[ref], models[best]
    return (
        "p",
        f"**Release vs the teacher FP32** (`{ref}`): "
        f"{speedup_text(speedup(models, ref, rel))} faster, "
        f"{num(ratio_of(r.get('size_mb'), m.get('size_mb')), '{:.1f}')}× smaller, "
        f"{num(difference(m.get('top1'), r.get('top1')), '{:+.2f}')} pp top-1. "
        f"**Release vs the best peer INT8** (`{best}`, the fastest INT8 build "
        f"of the teacher): "
        f"{speedup_text(speedup(models, best, rel))} faster, "
        f"{num(difference(m.get('top1'), b.get('top1')), '{:+.2f}')} pp top-1.",
    )


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
        {"": "tracked by DVC", "value": mark(origin.get("tracked_by_dvc"))},
        {
            "": "classes in the file",
            "value": str(origin.get("classes_in_file"))
            + (" (classifier replaced)" if origin.get("head_replaced") else ""),
        },
        {
            "": "top-1 as imported (val / test %)",
            "value": (
                f"{num(as_imported.get('val'), '{:.2f}')} / "
                f"{num(as_imported.get('test'), '{:.2f}')}"
            ),
        },
        {
            "": "top-1 after adaptation (val / test %)",
            "value": (
                f"{num(adapted.get('val'), '{:.2f}')} / {num(adapted.get('test'), '{:.2f}')}"
                if adapted
                else "not adapted (`teacher.epochs: 0`)"
            ),
        },
    ]
    return blocks + [("table", pd.DataFrame(rows))]
