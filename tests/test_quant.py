"""ONNX Runtime post-training quantization (resnet_slim/compress/quant.py) and the calibration
sets of PTQ and QAT: an empty set or a missing model is one clear error and writes nothing."""

import re

import numpy as np
import pytest
import torch

from resnet_slim.compress import export, qat, quant
from resnet_slim.errors import UserError
from tests.conftest import assert_not_written, stage_main, tiny_params


def test_empty_calibration_sets(tmp_path, tiny_model):
    empty = torch.zeros(0, 3, 8, 8)
    with pytest.raises(
        UserError, match="calibration set is empty: the training split has no images"
    ):
        quant.calibration_images(empty, 256, seed=0)
    with pytest.raises(UserError, match="QAT calibration set is empty"):
        qat.calibrate(qat.prepare_qat_model(tiny_model), empty)
    with pytest.raises(UserError, match="PTQ calibration set is empty"):
        qat.eager_ptq_int8(tiny_model, empty)
    export.export_onnx(tiny_model, tmp_path / "fp32.onnx", image_size=8, opset=17)
    with pytest.raises(UserError, match="calibration set is empty"):
        quant.quantize_static_int8(
            tmp_path / "fp32.onnx", tmp_path / "int8.onnx", np.zeros((0, 3, 8, 8), np.float32)
        )
    assert_not_written(tmp_path / "int8.onnx")


def test_ptq_stage_with_an_empty_training_split(prepared_copy, tmp_path, tiny_model):
    np.save(prepared_copy / "train_images.npy", np.zeros((0, 8, 8, 3), np.uint8))
    np.save(prepared_copy / "train_labels.npy", np.zeros(0, np.int64))
    export.export_onnx(tiny_model, tmp_path / "fp32.onnx", image_size=8, opset=17)
    with pytest.raises(UserError, match="calibration set is empty"):
        stage_main("ptq")(
            [
                str(tmp_path / "fp32.onnx"),
                str(tmp_path / "int8.onnx"),
                "--params",
                str(tiny_params(tmp_path / "params.yaml")),
                "--data",
                str(prepared_copy),
            ]
        )
    assert_not_written(tmp_path / "int8.onnx")


def test_ptq_of_a_missing_fp32_model_writes_nothing(tmp_path):
    calibration = np.zeros((4, 3, 8, 8), np.float32)
    with pytest.raises(UserError, match="none.onnx: ONNX model not found"):
        quant.quantize_static_int8(tmp_path / "none.onnx", tmp_path / "int8.onnx", calibration)
    with pytest.raises(UserError, match="none.onnx: ONNX model not found"):
        quant.quantize_dynamic_int8(tmp_path / "none.onnx", tmp_path / "dyn.onnx")
    assert_not_written(tmp_path / "int8.onnx", tmp_path / "dyn.onnx")


def test_static_int8_ships_short_names_and_computes_exactly_the_same(
    tmp_path, tiny_model, monkeypatch
):
    """The static INT8 file (a release candidate) is what onnxruntime's quantizer writes with
    every inner tensor renamed to a short id: the same outputs bit for bit, fewer bytes, the
    input and output names kept (a caller feeds them by name)."""
    import onnx

    export.export_onnx(tiny_model, tmp_path / "fp32.onnx", image_size=8, opset=17)
    calibration = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    quant.quantize_static_int8(tmp_path / "fp32.onnx", tmp_path / "short.onnx", calibration)
    monkeypatch.setattr(quant, "shorten_names", lambda model: None)  # as the quantizer wrote it
    quant.quantize_static_int8(tmp_path / "fp32.onnx", tmp_path / "long.onnx", calibration)

    short, long = (onnx.load(str(tmp_path / f"{n}.onnx")).graph for n in ("short", "long"))
    assert [v.name for v in (*short.input, *short.output)] == [
        v.name for v in (*long.input, *long.output)
    ]
    outer = {v.name for v in (*short.input, *short.output)}
    inner = {t.name for t in short.initializer} | {o for n in short.node for o in n.output}
    assert all(re.fullmatch(r"t\d+", name) for name in inner - outer)
    assert len(inner) == len(
        {t.name for t in long.initializer} | {o for n in long.node for o in n.output}
    )
    assert (tmp_path / "short.onnx").stat().st_size < (tmp_path / "long.onnx").stat().st_size
    x = torch.from_numpy(calibration)
    assert np.array_equal(
        export.run_onnx(export.make_session(tmp_path / "short.onnx"), x),
        export.run_onnx(export.make_session(tmp_path / "long.onnx"), x),
    )
