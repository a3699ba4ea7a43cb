"""A run's results, frozen for review in git: `reports/<name>/` beside the default run's reports.

A snapshot holds what a reviewer needs to check a claim without re-running the pipeline: the report
and its plots, the gate's verdict and evidence, the per-image predictions of every benchmarked
model, the training curves, the ONNX files of the reference and of every gate candidate, and
`preprocess.json`: how to turn an image file into the models' input, so anyone can re-score the
ONNX files on their own copy of the test images (tests/test_snapshots.py does, on 500 of them).
"""

import shutil
from pathlib import Path

from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path, read_json, sha256_file, write_json

REPORT_FILES = [
    "report.md",
    "report.html",
    "benchmark.json",
    "gate.json",
    "metrics.json",
    "predictions.csv",
]
# written only when the run made them (export.targets; the latency_table stage)
OPTIONAL_FILES = ["targets.json", "targets_predictions.csv", "latency_table.json"]
# training curves worth keeping: (source under reports/, name in the snapshot)
CURVES = [
    ("teacher/plots/metrics/val_top1.tsv", "curves/teacher_val_top1.tsv"),
    ("prune/finetune/plots/metrics/val_top1.tsv", "curves/prune_finetune_val_top1.tsv"),
    ("distill/kd_before_fit/plots/metrics/val_top1.tsv", "curves/distill_before_fit_val_top1.tsv"),
    ("distill/kd/plots/metrics/val_top1.tsv", "curves/distill_kd_val_top1.tsv"),
    ("distill/no_kd/plots/metrics/val_top1.tsv", "curves/distill_no_kd_val_top1.tsv"),
]
SUMMARIES = ["teacher/summary.json", "prune/metrics.json", "distill/metrics.json"]


def preprocess_record(meta: dict) -> dict:
    """How an image file becomes the ONNX input, from the prepared data's meta.json."""
    size = meta["image_size"]
    return {
        "input": f"float32 NCHW [N, 3, {size}, {size}]",
        "steps": [
            "decode the file with Pillow, convert('RGB')",
            f"resize to {size}x{size} with Image.BILINEAR (skipped when already that size)",
            "scale to [0, 1]: pixels / 255",
            "normalise per channel: (x - mean) / std, channels in RGB order",
        ],
        "image_size": size,
        "channel_order": "RGB",
        "scale": 1 / 255,
        "mean": meta["mean"],
        "std": meta["std"],
        "normalization": meta.get("normalization"),
        "class_names": meta["class_names"],
        "dataset_root": meta.get("root"),
        "image_ids": "predictions.csv's `image` column: paths relative to dataset_root",
        "output": "logits, one per class in class_names order; the prediction is the argmax",
    }


def write_snapshot(root: str | Path, out_dir: str | Path, max_onnx_mb: float = 10.0) -> list[str]:
    """Copy the run in `root` (a workspace after `dvc repro` / `dvc exp run`) to `out_dir`.

    ONNX files over `max_onnx_mb` (a full-width ResNet-18 teacher is 45 MB: not for git) are left
    out and named, with their size and sha256, in `models/left_out.json`. The directory is
    replaced as a whole (built beside it, then swapped). Returns the files written.
    """
    root, out_dir = Path(root), Path(out_dir)
    reports = root / "reports"
    missing = [name for name in REPORT_FILES if not (reports / name).is_file()]
    if missing:
        raise UserError(f"{reports} lacks {', '.join(missing)}: run the pipeline to the report")
    gate = read_json(reports / "gate.json", "gate verdict")
    candidates = [c["model"] for c in (gate.get("selection") or {}).get("candidates", [])]
    models = list(dict.fromkeys([gate["reference"], gate["release"], *candidates]))
    onnx = [root / "models" / f"{name}.onnx" for name in models]
    absent = [str(path) for path in onnx if not path.is_file()]
    if absent:
        raise UserError(f"the gate's models are missing: {', '.join(absent)}")
    meta = read_json(root / "data" / "prepared" / "meta.json", "prepared data meta")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in REPORT_FILES + [n for n in OPTIONAL_FILES if (reports / n).is_file()]:
            shutil.copyfile(reports / name, tmp / name)
        for source, name in CURVES + [(s, s.replace("/", "_")) for s in SUMMARIES]:
            if (reports / source).is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(reports / source, tmp / name)
        (tmp / "plots").mkdir()  # the report's images (report.html embeds them, report.md links)
        for png in sorted((reports / "plots").glob("*.png")):
            shutil.copyfile(png, tmp / "plots" / png.name)
        (tmp / "models").mkdir()
        left_out = {}
        for path in onnx:
            size = path.stat().st_size
            if size > max_onnx_mb * 1e6:
                left_out[path.name] = {"bytes": size, "sha256": sha256_file(path)}
            else:
                shutil.copyfile(path, tmp / "models" / path.name)
        if left_out:
            write_json(tmp / "models" / "left_out.json", left_out)
        write_json(tmp / "preprocess.json", preprocess_record(meta))
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return written
