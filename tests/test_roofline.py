"""MAC counting from ONNX shapes, the conv micro-benchmark, and the achieved fraction of the peak."""

import pytest
import torch

from resnet_slim import roofline
from resnet_slim.export import export_onnx
from resnet_slim.prune import count_macs_params


def test_count_macs_by_hand(tmp_path):
    # conv 3->8, 3x3, pad 1 at 8x8: 8*8*8 outputs x 3*3*3 MACs; linear 8->10 after pooling: 80
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    export_onnx(model.eval(), tmp_path / "m.onnx", image_size=8, opset=17)
    assert roofline.count_macs(tmp_path / "m.onnx") == 8 * 8 * 8 * 27 + 80


def test_count_macs_agrees_with_torch_pruning_on_a_resnet(tmp_path, tiny_model):
    export_onnx(tiny_model, tmp_path / "r.onnx", image_size=16, opset=17)
    torch_macs, _ = count_macs_params(tiny_model, 16)
    # torch-pruning also counts BN, adds and pooling; convs + linear are ~all of it
    assert roofline.count_macs(tmp_path / "r.onnx") == pytest.approx(torch_macs, rel=0.03)


def test_int8_files_count_the_same_macs_as_their_fp32_source(tmp_path, tiny_model):
    import numpy as np
    import onnx

    from resnet_slim.quant import quantize_dynamic_int8, quantize_static_int8

    export_onnx(tiny_model, tmp_path / "r.onnx", image_size=16, opset=17)
    quantize_dynamic_int8(tmp_path / "r.onnx", tmp_path / "dynamic.onnx")  # ConvInteger / MatMulInteger
    calibration = np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)
    quantize_static_int8(tmp_path / "r.onnx", tmp_path / "static.onnx", calibration)  # QDQ + Conv
    ops = {n.op_type for n in onnx.load(str(tmp_path / "dynamic.onnx")).graph.node}
    assert "ConvInteger" in ops
    fp32 = roofline.count_macs(tmp_path / "r.onnx")
    assert roofline.count_macs(tmp_path / "dynamic.onnx") == fp32
    assert roofline.count_macs(tmp_path / "static.onnx") == fp32


def test_conv_peak_and_efficiency():
    peak = roofline.conv_peak_gmacs(runs=3, shapes=((16, 8, 2),))
    assert peak["fp32_gmacs"] > 0 and peak["int8_gmacs"] > 0 and len(peak["shapes"]) == 1
    e = roofline.efficiency(2_000_000, 1.0, peak_gmacs=4.0)  # floor 0.5 ms of a measured 1 ms
    assert e == {"macs": 2_000_000, "gmacs_per_s": 2.0, "floor_ms": 0.5, "peak_fraction": 0.5}
    assert roofline.is_quantized(["Conv", "QuantizeLinear"]) and not roofline.is_quantized(["Conv"])
