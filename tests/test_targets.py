"""Deployment targets: OpenVINO FP32 / NNCF INT8 and LiteRT exported from tiny models, parity
against the reference, benchmark rows, and unavailable targets that carry their exact reason."""

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_slim.checkpoints import save_checkpoint
from resnet_slim.compress.export import export_onnx, torch_logits
from resnet_slim.compress.quant import calibration_images, quantize_static_int8
from resnet_slim.data.loader import normalized_split
from resnet_slim.errors import UserError
from resnet_slim.limits import usable_cores
from resnet_slim.measure import target_bench, targets
from resnet_slim.params import BenchmarkParams, ExportParams, load_params
from resnet_slim.train.models import make_arch
from tests.conftest import write_params

FAST = BenchmarkParams(warmup=2, rounds=5, runs_per_round=2, bootstrap_resamples=100)
ROW_KEYS = (
    "top1",
    "n_test",
    "size_mb",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "threads",
    "p50_ms_all_cores",
    "runtime",
    "file",
)


@pytest.fixture
def tiny_onnx(tmp_path, tiny_model):
    path = tmp_path / "tiny.onnx"
    export_onnx(tiny_model, path, image_size=8, opset=17)
    return path


@pytest.fixture
def test_split(tiny_prepared):
    return normalized_split(tiny_prepared, "test")


@pytest.fixture
def calibration(tiny_prepared):
    return calibration_images(normalized_split(tiny_prepared, "train")[0], 32, seed=0)


def assert_row(row, runtime):
    for key in ROW_KEYS:
        assert row[key] is not None, key
    assert row["runtime"].startswith(runtime) and row["threads"] == FAST.threads
    assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["size_mb"] > 0
    assert row["p50_ms_all_cores"] > 0 and row["threads_all_cores"] == usable_cores()
    assert len(row["predictions"]) == row["n_test"]


def test_openvino_fp32_matches_onnx_and_pytorch(tmp_path, tiny_onnx, tiny_model, test_split):
    images, labels = test_split
    xml = targets.export_openvino(tiny_onnx, tmp_path / "ov")
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert 'element_type="f16"' not in xml.read_text()  # FP32 weights, not compressed to FP16
    row, logits = target_bench.benchmark_openvino(xml, images, labels, FAST)
    assert_row(row, "openvino")
    for reference in (
        target_bench.onnx_logits(tiny_onnx, images),
        torch_logits(tiny_model, images),
    ):
        parity = target_bench.check_target_parity(
            logits, reference, labels, ExportParams(), int8=False, reference="onnx"
        )
        assert (
            parity["passed"] and parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4
        )


def test_nncf_int8_and_openvino_of_a_qdq_file(tmp_path, tiny_onnx, test_split, calibration):
    images, labels = test_split
    xml = targets.quantize_openvino_nncf(tiny_onnx, calibration, tmp_path / "nncf")
    assert 'element_type="i8"' in xml.read_text()  # NNCF stored int8 weights in the IR
    row, logits = target_bench.benchmark_openvino(xml, images, labels, FAST)
    assert_row(row, "openvino")
    reference = target_bench.onnx_logits(tiny_onnx, images)
    parity = target_bench.check_target_parity(
        logits, reference, labels, ExportParams(), int8=True, reference="onnx"
    )
    assert parity["top1_agreement"] > 0.8 and np.isfinite(parity["top1_diff_pp"])
    # an onnxruntime QDQ file (what QAT exports) stays int8 on OpenVINO
    qdq = tmp_path / "qdq.onnx"
    quantize_static_int8(tiny_onnx, qdq, calibration)
    qdq_xml = targets.export_openvino(qdq, tmp_path / "q")
    assert 'element_type="i8"' in qdq_xml.read_text()
    _, qdq_logits = target_bench.benchmark_openvino(qdq_xml, images, labels, FAST)
    assert (qdq_logits.argmax(1) == target_bench.onnx_logits(qdq, images).argmax(1)).mean() > 0.8


def test_parity_thresholds_for_fp32_and_int8_targets():
    labels = torch.tensor([0, 1, 1, 0])
    reference = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]], np.float32)
    flipped = reference.copy()
    flipped[0] = [0.0, 2.0]  # one of four images changes class: -25 pp
    fp32 = target_bench.check_target_parity(
        reference + 1e-5, reference, labels, ExportParams(), int8=False, reference="r"
    )
    assert fp32["passed"] and fp32["problems"] == []
    bad = target_bench.check_target_parity(
        flipped, reference, labels, ExportParams(), int8=False, reference="r"
    )
    assert not bad["passed"] and "agreement" in bad["problems"][0]
    int8 = target_bench.check_target_parity(
        flipped, reference, labels, ExportParams(max_top1_diff_pp=1.0), int8=True, reference="r"
    )
    assert (
        not int8["passed"] and int8["top1_diff_pp"] == -25.0 and "-25.00 pp" in int8["problems"][0]
    )
    loose = ExportParams(max_top1_diff_pp=30.0)
    assert target_bench.check_target_parity(
        flipped, reference, labels, loose, int8=True, reference="r"
    )["passed"]


@pytest.mark.parametrize("module", ["openvino", "nncf"])
def test_missing_openvino_or_nncf_is_an_unavailable_row(
    monkeypatch, tmp_path, tiny_onnx, test_split, calibration, module
):
    monkeypatch.setitem(sys.modules, module, None)  # what `import openvino` sees when not installed
    row = target_bench.measure_target(
        lambda: targets.quantize_openvino_nncf(tiny_onnx, calibration, tmp_path / "x"),
        lambda path: pytest.fail("measured an unavailable target"),
        lambda: None,
        reference="r",
        labels=test_split[1],
        p=ExportParams(),
        int8=True,
        target="openvino",
        role="peer",
    )
    assert row["status"] == "unavailable" and row["target"] == "openvino"
    assert row["reason"].startswith(f"python package '{module}' cannot be imported")
    assert "requirements.txt" in row["reason"] and not (tmp_path / "x").exists()


def test_litert_without_its_converter_environment_names_the_conflict(
    monkeypatch, tmp_path, tiny_model, calibration
):
    checkpoint = tmp_path / "student.pt"
    save_checkpoint(
        checkpoint,
        model=tiny_model,
        arch=make_arch(name="resnet18", num_classes=10, width=8),
        params={},
        metrics={},
    )
    monkeypatch.setattr(targets, "LITERT_VENV", tmp_path / "no-venv")
    with pytest.raises(targets.Unavailable) as err:
        targets.export_tflite(checkpoint, calibration, tmp_path / "m.tflite")
    assert "make install-litert" in str(err.value)
    assert "xdsl==0.28.0" in str(err.value) and "typing-extensions>=4.16.0" in str(err.value)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(
        targets.Unavailable, match="'ai_edge_litert.interpreter' cannot be imported"
    ):
        targets.LiteRtSession(tmp_path / "m.tflite", threads=1)


def test_mindspore_and_tensorrt_carry_their_exact_reasons(monkeypatch, tmp_path, tiny_onnx):
    with pytest.raises(targets.Unavailable) as err:
        targets.export_mindspore(tiny_onnx, tmp_path / "m.ms")
    assert "CPython 3.7 only" in str(err.value) and "cp311" in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(targets.Unavailable, match=r"needs an NVIDIA GPU with CUDA \(torch.cuda"):
        targets.export_tensorrt(tiny_onnx, tmp_path / "m.engine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine ...
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # ... without tensorrt
    with pytest.raises(targets.Unavailable, match="'tensorrt' cannot be imported.*tensorrt==11"):
        targets.export_tensorrt(tiny_onnx, tmp_path / "m.engine")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # ... with it
    with pytest.raises(targets.Unavailable, match="TensorRT 11 removed BuilderFlag.FP16"):
        targets.export_tensorrt(tiny_onnx, tmp_path / "m.engine")


def test_bad_inputs_are_one_line_user_errors(tmp_path, calibration):
    missing = tmp_path / "missing.onnx"
    for export in (targets.export_openvino, targets.export_mindspore, targets.export_tensorrt):
        with pytest.raises(UserError, match="missing.onnx: ONNX model not found"):
            export(missing, tmp_path / "out")
    with pytest.raises(UserError, match="missing.onnx: ONNX model not found"):
        targets.quantize_openvino_nncf(missing, calibration, tmp_path / "out")
    with pytest.raises(UserError, match="student.pt: checkpoint not found"):
        targets.export_tflite(tmp_path / "student.pt", calibration, tmp_path / "m.tflite")
    with pytest.raises(UserError, match="model.xml: OpenVINO IR not found"):
        targets.OpenVinoSession(tmp_path / "model.xml", threads=1)
    path = write_params(tmp_path / "params.yaml", export={"targets": ["onnx", "coreml"]})
    with pytest.raises(
        UserError,
        match=r"export.targets.1: Input should be 'onnx', 'openvino', "
        r"'tflite', 'mindspore' or 'tensorrt' \(got 'coreml'\)",
    ):
        load_params(path)
    assert not list(tmp_path.glob("out*"))


def test_stage_writes_every_requested_target_and_peer(
    monkeypatch, tmp_path, tiny_model, tiny_onnx, tiny_prepared, calibration, capsys
):
    from stages.export_targets import main

    checkpoint = tmp_path / "student.pt"
    save_checkpoint(
        checkpoint,
        model=tiny_model,
        arch=make_arch(name="resnet18", num_classes=10, width=8),
        params={},
        metrics={},
    )
    int8 = tmp_path / "student_qat_int8.onnx"
    quantize_static_int8(tiny_onnx, int8, calibration)
    params = write_params(
        tmp_path / "params.yaml",
        ptq={"calibration_images": 32},
        benchmark={"warmup": 1, "rounds": 5, "runs_per_round": 1, "bootstrap_resamples": 100},
        # 80 test images: one flipped image is 1.25 pp on an untrained model
        export={
            "targets": ["onnx", "openvino", "tflite", "mindspore", "tensorrt"],
            "max_top1_diff_pp": 10.0,
        },
    )
    monkeypatch.setattr(targets, "LITERT_VENV", tmp_path / "no-venv")  # the fast path: no converter
    out = tmp_path / "targets.json"
    main(
        [
            "--teacher-onnx",
            str(tiny_onnx),
            "--student",
            str(checkpoint),
            "--student-onnx",
            str(tiny_onnx),
            "--student-int8-onnx",
            str(int8),
            "--params",
            str(params),
            "--data",
            str(tiny_prepared),
            "--models-out",
            str(tmp_path / "models"),
            "--out",
            str(out),
            "--predictions",
            str(tmp_path / "predictions.csv"),
        ]
    )
    rows = json.loads(out.read_text())["models"]
    assert set(rows) == {
        "student_qat_int8_openvino",
        "student_tflite_int8",
        "student_mindspore_lite",
        "student_tensorrt_fp16",
        "teacher_openvino_fp32",
        "teacher_openvino_nncf_int8",
    }
    assert rows["teacher_openvino_fp32"]["status"] == "ok"
    assert rows["teacher_openvino_fp32"]["parity"]["max_abs_diff"] < 1e-4
    assert rows["student_qat_int8_openvino"]["status"] == "ok"
    assert rows["teacher_openvino_nncf_int8"]["role"] == "peer"
    for name in ("student_tflite_int8", "student_mindspore_lite", "student_tensorrt_fp16"):
        assert rows[name]["status"] == "unavailable" and rows[name]["reason"], name
    assert "predictions" not in rows["teacher_openvino_fp32"]
    header = (tmp_path / "predictions.csv").read_text().splitlines()[0]
    assert header.startswith("image,label,") and "teacher_openvino_nncf_int8" in header
    assert (tmp_path / "models" / "teacher_openvino_fp32" / "model.bin").is_file()
    assert "student_mindspore_lite" in capsys.readouterr().out


@pytest.mark.skipif(
    not (targets.LITERT_VENV / "bin" / "python").is_file() and not os.environ.get("CI"),
    reason="LiteRT converter environment .venv-litert not built (make install-litert; "
    "`make test` builds it, and under CI a missing one fails this test)",
)
def test_tflite_int8_export_matches_pytorch(
    tmp_path, tiny_model, test_split, calibration, monkeypatch
):
    images, labels = test_split
    monkeypatch.chdir(
        tmp_path
    )  # relative paths, as dvc.yaml passes them (the converter runs elsewhere)
    checkpoint = Path("models") / "student.pt"
    save_checkpoint(
        checkpoint,
        model=tiny_model,
        arch=make_arch(name="resnet18", num_classes=10, width=8),
        params={},
        metrics={},
    )
    path = targets.export_tflite(checkpoint, calibration, Path("models") / "m.tflite")
    row, logits = target_bench.benchmark_tflite(path, images, labels, FAST)
    assert_row(row, "litert")
    parity = target_bench.check_target_parity(
        logits,
        torch_logits(tiny_model, images),
        labels,
        ExportParams(),
        int8=True,
        reference="pytorch",
    )
    assert parity["top1_agreement"] > 0.8 and parity["max_abs_diff"] < 0.5


def test_stage_with_only_onnx_and_no_peers_writes_empty_outputs(tmp_path, tiny_prepared):
    from stages.export_targets import main

    params = write_params(
        tmp_path / "params.yaml", export={"targets": ["onnx"]}, benchmark={"peers": False}
    )
    none = [str(tmp_path / name) for name in ("none.onnx", "none.pt", "none_s.onnx", "none_q.onnx")]
    main(
        [
            "--teacher-onnx",
            none[0],
            "--student",
            none[1],
            "--student-onnx",
            none[2],
            "--student-int8-onnx",
            none[3],
            "--params",
            str(params),
            "--data",
            str(tiny_prepared),
            "--models-out",
            str(tmp_path / "models"),
            "--out",
            str(tmp_path / "targets.json"),
            "--predictions",
            str(tmp_path / "p.csv"),
        ]
    )
    assert json.loads((tmp_path / "targets.json").read_text())["models"] == {}
    assert (tmp_path / "models").is_dir()  # the stage's DVC output exists even when empty
