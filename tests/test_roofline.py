"""MAC counting from ONNX shapes (the one MAC count), the conv micro-benchmark, and the achieved
fraction of the peak."""

import pytest
import torch
import torch_pruning as tp
from torch import nn

from resnet_slim.compress.export import count_macs, count_macs_params, export_onnx
from resnet_slim.measure import roofline
from resnet_slim.train.models import build_model, make_arch


def test_count_macs_by_hand(tmp_path):
    # conv 3->8, 3x3, pad 1 at 8x8: 8*8*8 outputs x 3*3*3 MACs; linear 8->10 after pooling: 80
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    export_onnx(model.eval(), tmp_path / "m.onnx", image_size=8, opset=17)
    assert count_macs(tmp_path / "m.onnx") == 8 * 8 * 8 * 27 + 80


@pytest.mark.parametrize(
    "arch",
    [
        make_arch(name="resnet18", num_classes=10, width=8, small_input=True),
        make_arch(
            name="resnet50", num_classes=10, width=8, small_input=False
        ),  # bottlenecks, stem pool
        {
            **make_arch(
                name="resnet18", num_classes=10, width=8, small_input=True
            ),  # lowrank pairs
            "lowrank": {"layer2.0.conv1": 4, "fc": 3},
        },
    ],
    ids=["resnet18", "resnet50", "lowrank"],
)
def test_macs_are_torch_pruning_conv_and_linear_macs_without_bias_bn_relu_or_pooling(
    arch, tmp_path
):
    """The convention, checked against torch-pruning's counter (count_ops_and_params): both count
    Cin/groups x kH x kW MACs per conv output and in_features per linear output; torch-pruning also
    adds 1 per output for a bias, 2 per BN element, 1 per ReLU / pooled element. Residual adds are
    counted by neither. The PyTorch count is the ONNX count of the model's export, exactly."""
    torch.manual_seed(0)
    model = build_model(arch).eval()
    example = torch.zeros(1, 3, 16, 16)
    total, params, per_layer, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda m, _, out: outputs.__setitem__(m, out.numel()))
        for m in layers
        if m.bias is not None
    ]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    expected = sum(per_layer[m] for m in layers) - sum(outputs.values())  # minus one add per bias
    macs, n_params = count_macs_params(model, 16)
    assert macs == expected and n_params == params
    assert expected < total  # what torch-pruning adds: BN, ReLU, pooling and the biases
    export_onnx(model, tmp_path / "m.onnx", image_size=16, opset=17)
    assert count_macs(tmp_path / "m.onnx") == macs


def test_int8_files_count_the_same_macs_as_their_fp32_source(tmp_path, tiny_model):
    import numpy as np
    import onnx

    from resnet_slim.compress.quant import quantize_dynamic_int8, quantize_static_int8

    export_onnx(tiny_model, tmp_path / "r.onnx", image_size=16, opset=17)
    quantize_dynamic_int8(
        tmp_path / "r.onnx", tmp_path / "dynamic.onnx"
    )  # ConvInteger / MatMulInteger
    calibration = np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)
    quantize_static_int8(tmp_path / "r.onnx", tmp_path / "static.onnx", calibration)  # QDQ + Conv
    ops = {n.op_type for n in onnx.load(str(tmp_path / "dynamic.onnx")).graph.node}
    assert "ConvInteger" in ops
    fp32 = count_macs(tmp_path / "r.onnx")
    assert count_macs(tmp_path / "dynamic.onnx") == fp32
    assert count_macs(tmp_path / "static.onnx") == fp32


def test_conv_peak_and_efficiency():
    peak = roofline.conv_peak_gmacs(runs=3, shapes=((16, 8, 2),))
    assert peak["fp32_gmacs"] > 0 and peak["int8_gmacs"] > 0 and len(peak["shapes"]) == 1
    e = roofline.efficiency(2_000_000, 1.0, peak_gmacs=4.0)  # floor 0.5 ms of a measured 1 ms
    assert e == {"macs": 2_000_000, "gmacs_per_s": 2.0, "floor_ms": 0.5, "peak_fraction": 0.5}
    assert roofline.is_quantized(["Conv", "QuantizeLinear"]) and not roofline.is_quantized(["Conv"])


def test_add_efficiency_uses_the_peak_of_each_onnx_rows_kind(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(
        roofline, "conv_peak_gmacs", lambda **given: {"fp32_gmacs": 1.0, "int8_gmacs": 4.0, **given}
    )  # the micro-benchmark itself: above
    export_onnx(tiny_model, tmp_path / "r.onnx", image_size=16, opset=17)
    file, macs = str(tmp_path / "r.onnx"), count_macs(tmp_path / "r.onnx")
    rows = {
        "fp32": {"runtime": "onnxruntime", "file": file, "p50_ms": 1.0, "onnx_ops": ["Conv"]},
        "int8": {
            "runtime": "onnxruntime",
            "file": file,
            "p50_ms": 1.0,
            "onnx_ops": ["Conv", "DequantizeLinear"],
        },
        "eager": {"runtime": "pytorch", "file": "t.json", "p50_ms": 1.0},
    }
    peak = roofline.add_efficiency(rows, threads=1, reduce_range=True)
    assert peak == {"fp32_gmacs": 1.0, "int8_gmacs": 4.0, "threads": 1, "reduce_range": True}
    assert rows["fp32"]["peak_kind"] == "fp32" and rows["fp32"]["floor_ms"] == pytest.approx(
        macs / 1e6
    )
    assert rows["int8"]["peak_kind"] == "int8" and rows["int8"]["floor_ms"] == pytest.approx(
        macs / 4e6
    )
    assert (
        rows["int8"]["macs"] == macs and "macs" not in rows["eager"]
    )  # PyTorch rows: no ONNX file
