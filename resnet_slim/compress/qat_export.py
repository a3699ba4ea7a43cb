"""Export of a QAT model to an INT8 QDQ ONNX file, and the check that accepts or rejects it.

Export folds BN into each conv with its running statistics (what the QAT module computes in eval
mode), keeps the learned fake quants frozen, and traces with the TorchScript exporter, which writes
QuantizeLinear/DequantizeLinear. An unfolded export keeps float Conv+Div+BN (slower than FP32).
`onnx_int8.store_int8` then stores int8 weights and int32 biases, and `export_qat_checked` accepts
the file only if ORT runs every conv as an int8 kernel (`onnx_int8.int8_kernel_report`) and its
classes match the PyTorch QAT model's (resnet_slim/compress/qat.py trains that model).
"""

import copy
import tempfile
from pathlib import Path

import onnx
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
from torch import nn
from torch.ao.quantization import FakeQuantize, disable_observer

from resnet_slim.compress.export import export_onnx, make_session, run_onnx, torch_logits
from resnet_slim.compress.onnx_int8 import int8_kernel_report, shorten_names, store_int8
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path
from resnet_slim.train.models import replace_submodule


class _Frozen(nn.Module):
    """A QAT conv (BN folded in with its running statistics) or linear layer as ONNX will run it:
    weight already on its learned integer grid, re-expressed as an 8-bit fake quant (lossless, and
    the only range the ONNX exporter accepts), then ReLU and the learned output fake quant."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        weight, bias = layer.weight.detach(), layer.bias
        bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach()
        if isinstance(layer, nniqat.ConvBn2d):  # ConvBnReLU2d is a subclass
            bn = layer.bn  # fold exactly as the QAT forward scales (same float rounding)
            factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            weight = weight * factor.reshape(-1, 1, 1, 1)
            bias = bn.bias.detach() + (bias - bn.running_mean) * factor
        fake_quant = layer.weight_fake_quant
        self.register_buffer("weight", fake_quant(weight).detach())
        self.register_buffer("bias", bias)
        self.register_buffer("scale", fake_quant.scale)
        self.register_buffer("zero_point", fake_quant.zero_point)
        self.conv_args = (
            None
            if isinstance(layer, nn.Linear)
            else (layer.stride, layer.padding, layer.dilation, layer.groups)
        )
        self.relu = isinstance(layer, (nniqat.ConvBnReLU2d, nniqat.ConvReLU2d, nniqat.LinearReLU))
        self.activation_post_process = layer.activation_post_process

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.fake_quantize_per_channel_affine(
            self.weight, self.scale, self.zero_point, 0, -128, 127
        )
        y = (
            nn.functional.linear(x, w, self.bias)
            if self.conv_args is None
            else nn.functional.conv2d(x, w, self.bias, *self.conv_args)
        )
        return self.activation_post_process(torch.relu(y) if self.relu else y)


def _folded_copy(qat_model: nn.Module) -> nn.Module:
    model = copy.deepcopy(qat_model).eval()
    model.apply(disable_observer)
    for fq in model.modules():
        seen = fq.activation_post_process.min_val if isinstance(fq, FakeQuantize) else None
        if seen is not None and (seen.numel() == 0 or not torch.isfinite(seen).all()):
            raise UserError("the QAT model has uncalibrated quantizers; run calibrate() first")
    for name, module in list(model.named_modules()):
        # nnqat.Conv2d / Linear are the bases of the fused ConvReLU2d / LinearReLU
        if isinstance(module, (nnqat.Conv2d, nniqat.ConvBn2d, nnqat.Linear)):
            replace_submodule(model, name, _Frozen(module))
    return model


def export_qat_onnx(
    qat_model: nn.Module, path: str | Path, *, image_size: int, opset: int = 17
) -> None:
    """Write the QAT model as an INT8 QDQ ONNX file (BN folded, int8 weights, int32 biases)."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        raw = Path(tmp_dir) / "fakequant.onnx"
        export_onnx(_folded_copy(qat_model), raw, image_size=image_size, opset=opset)
        model = onnx.load(str(raw))
    store_int8(model.graph)
    shorten_names(model)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)


def export_qat_checked(
    qat_model: nn.Module,
    onnx_path: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    opset: int,
    threads: int,
    min_agreement: float,
    val_top1: float,
    fp32_metrics: dict,
) -> dict:
    """export_qat_onnx, then the acceptance test: the file passes only if onnxruntime runs every
    conv as an int8 kernel and gives the PyTorch QAT model's class on at least `min_agreement` of
    the test images. Per-image agreement, not a top-1 difference: on 80 images one flipped
    prediction is 1.25 pp, and onnxruntime's INT8 arithmetic differs between AVX2 and VNNI CPUs,
    so a top-1 limit in pp rejected a faithful export on one kind and passed it on the other.
    Returns the QAT metrics record; "problems" says why the caller must reject the file."""
    torch_classes = torch.from_numpy(torch_logits(qat_model, images)).argmax(1)
    reference_top1 = 100.0 * (torch_classes == labels).float().mean().item()  # engine.evaluate's
    export_qat_onnx(qat_model, onnx_path, image_size=images.shape[-1], opset=opset)
    onnx_classes = run_onnx(make_session(onnx_path, threads=threads), images).argmax(1)
    onnx_top1 = float(100.0 * (onnx_classes == labels.numpy()).mean())
    agreement = float((onnx_classes == torch_classes.numpy()).mean())
    kernels = int8_kernel_report(onnx_path)
    problems = []
    if not agreement >= min_agreement:
        problems.append(
            f"ONNX and PyTorch QAT agree on {agreement:.2%} of {len(labels)} test images "
            f"(ONNX top-1 {onnx_top1:.2f}% vs {reference_top1:.2f}%), below "
            f"qat.min_agreement={min_agreement}"
        )
    if not kernels["all_convs_int8"]:
        problems.append(
            f"onnxruntime runs {kernels['float_convs']} conv(s) in float "
            f"({kernels['int8_convs']} int8)"
        )
    return {
        "torch_top1": reference_top1,
        "onnx_top1": onnx_top1,
        "top1_diff_pp": onnx_top1 - reference_top1,
        "agreement": agreement,
        "val_top1": val_top1,
        "size_mb": Path(onnx_path).stat().st_size / 1e6,
        "kernels": kernels,
        "fp32_metrics": fp32_metrics,
        "passed": not problems,
        "problems": problems,
    }
