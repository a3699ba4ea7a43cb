"""ONNX Runtime post-training quantization (resnet_slim/compress/quant.py) and the calibration
sets of PTQ and QAT: an empty set or a missing model is one clear error and writes nothing."""

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
