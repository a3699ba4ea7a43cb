"""Committed run snapshots (reports/<name>/, stages/snapshot.py): consistent, and their ONNX files
re-score the test images they claim with nothing but Pillow, numpy, onnxruntime and
preprocess.json."""

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from resnet_slim.errors import UserError
from resnet_slim.io import sha256_file
from resnet_slim.report.snapshot import REPORT_FILES, write_snapshot
from stages import snapshot as snapshot_stage

REPO = Path(__file__).resolve().parents[1]
RESNET56 = REPO / "reports" / "cifar10-resnet56"


def read_predictions(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def onnx_argmax(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: x[i : i + 100]})[0].argmax(1) for i in range(0, len(x), 100)]
    )


def preprocess(file: Path, record: dict) -> np.ndarray:
    """preprocess.json's steps, written out independently of the library."""
    size = record["image_size"]
    with Image.open(file) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        x = np.asarray(image, dtype=np.float32) * np.float32(record["scale"])
    x = (x - np.array(record["mean"], np.float32)) / np.array(record["std"], np.float32)
    return x.transpose(2, 0, 1)


@pytest.mark.skipif(not RESNET56.is_dir(), reason="no reports/cifar10-resnet56 snapshot")
def test_resnet56_snapshot_is_consistent_with_its_benchmark_and_gate():
    bench = json.loads((RESNET56 / "benchmark.json").read_text())
    gate = json.loads((RESNET56 / "gate.json").read_text())
    rows = read_predictions(RESNET56 / "predictions.csv")
    assert len(rows) == 8000 and len({r["image"] for r in rows}) == 8000
    models = sorted(p.stem for p in (RESNET56 / "models").glob("*.onnx"))
    assert gate["reference"] in models and gate["release"] in models
    for name in models:  # the top-1 the benchmark reports is the one its predictions give
        top1 = 100.0 * np.mean([r[name] == r["label"] for r in rows])
        assert top1 == pytest.approx(bench["models"][name]["top1"], abs=1e-3), name


@pytest.mark.skipif(not RESNET56.is_dir(), reason="no reports/cifar10-resnet56 snapshot")
def test_resnet56_snapshot_models_rescore_500_test_images():
    record = json.loads((RESNET56 / "preprocess.json").read_text())
    root = (REPO / record["dataset_root"]).resolve()
    if not root.is_dir():
        pytest.skip(f"{root} is absent (shared data not mounted)")
    by_class: dict[str, list[dict]] = {}
    for row in read_predictions(RESNET56 / "predictions.csv"):
        by_class.setdefault(row["label"], []).append(row)
    rows = [row for label in sorted(by_class) for row in sorted(by_class[label], key=str)[:50]]
    x = np.stack([preprocess(root / row["image"], record) for row in rows])
    labels = np.array([int(row["label"]) for row in rows])
    assert len(rows) == 500
    for path in sorted((RESNET56 / "models").glob("*.onnx")):
        recorded = np.array([int(row[path.stem]) for row in rows])
        predicted = onnx_argmax(path, x)
        # Same file, same images: the same answers (INT8 kernels differ a little between CPUs,
        # so a handful of near-ties may flip); top-1 on the subset within 0.6 pp (3 images).
        assert np.mean(predicted == recorded) >= 0.99, path.name
        assert abs(np.mean(predicted == labels) - np.mean(recorded == labels)) <= 0.006, path.name


def fake_run(root: Path) -> Path:
    (root / "reports").mkdir(parents=True)
    for name in REPORT_FILES:
        (root / "reports" / name).write_text("{}\n")
    gate = {"reference": "teacher", "release": "b", "selection": {"candidates": [{"model": "a"}]}}
    (root / "reports" / "gate.json").write_text(json.dumps(gate))
    (root / "models").mkdir()
    for name in ("teacher", "a", "b", "other"):
        (root / "models" / f"{name}.onnx").write_bytes(name.encode())
    (root / "data" / "prepared").mkdir(parents=True)
    meta = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "class_names": ["x", "y"]}
    (root / "data" / "prepared" / "meta.json").write_text(json.dumps(meta))
    return root


def test_snapshot_copies_the_gates_models_and_replaces_the_directory_whole(tmp_path):
    root = fake_run(tmp_path / "ws")
    (root / "reports" / "plots").mkdir()
    (root / "reports" / "plots" / "pareto.png").write_bytes(b"png")
    out = tmp_path / "snap"
    out.mkdir()
    (out / "stale.txt").write_text("from an older snapshot")
    written = write_snapshot(root, out)
    assert {
        "models/teacher.onnx",
        "models/a.onnx",
        "models/b.onnx",
        "preprocess.json",
        "plots/pareto.png",  # report.md links it
    } <= set(written)
    assert not (out / "models" / "other.onnx").exists() and not (out / "stale.txt").exists()
    record = json.loads((out / "preprocess.json").read_text())
    assert record["mean"] == [0.5] * 3 and record["image_size"] == 32


def test_snapshot_of_an_incomplete_run_is_one_error_and_writes_nothing(tmp_path):
    root = fake_run(tmp_path / "ws")
    (root / "models" / "b.onnx").unlink()
    with pytest.raises(UserError, match="b.onnx"):
        write_snapshot(root, tmp_path / "snap")
    (root / "models" / "b.onnx").write_bytes(b"b")
    (root / "reports" / "gate.json").write_text("{not json")
    with pytest.raises(UserError, match="gate verdict is not valid JSON"):
        write_snapshot(root, tmp_path / "snap")
    (root / "reports" / "gate.json").unlink()
    with pytest.raises(UserError, match="lacks gate.json"):
        snapshot_stage.main([str(tmp_path / "snap"), "--root", str(root)])
    assert not (tmp_path / "snap").exists()


def test_snapshot_leaves_out_large_onnx_files_and_names_them(tmp_path):
    root = fake_run(tmp_path / "ws")
    (root / "models" / "teacher.onnx").write_bytes(b"t" * 2000)
    (root / "reports" / "targets.json").write_text("{}\n")
    snapshot_stage.main([str(tmp_path / "snap"), "--root", str(root), "--max-onnx-mb", "0.001"])
    out = tmp_path / "snap"
    assert not (out / "models" / "teacher.onnx").exists() and (out / "models" / "b.onnx").is_file()
    left_out = json.loads((out / "models" / "left_out.json").read_text())
    assert left_out == {
        "teacher.onnx": {"bytes": 2000, "sha256": sha256_file(root / "models" / "teacher.onnx")}
    }
    assert (out / "targets.json").is_file() and not (out / "targets_predictions.csv").exists()
