"""Quantization-aware training (eager torch.ao fake quant) and export to an INT8 QDQ ONNX file.

Why this route:
* Eager QAT on a copy: torchvision's Quantizable* block classes are swapped onto our blocks (same
  attributes, so parameter names and pruned channel counts survive), giving the residual add a
  FloatFunctional where its range is learned; QuantStub/DeQuantStub wrap the net; Conv+BN(+ReLU)
  are fused for QAT, so training sees the folded, fake-quantized weight that inference will use.
* Non-fused FakeQuantize with moving-average min/max observers: the fused default
  (`fused_moving_avg_obs_fake_quant`) has no ONNX export. uint8 activations (full range), int8
  per-channel symmetric weights (U8S8, ORT's fast x86 path, as `quant.quantize_static_int8`).
  For x86 the weights use 7 bits (WEIGHT_RANGE): without VNNI, ORT's U8S8 kernels saturate
  otherwise. Measured on an AVX2 EPYC: with 8-bit weights ORT's int8 logits drifted 0.7 (mean
  |diff|) from the QDQ reference run and test top-1 moved ~1 pp; with 7 bits they agree.
* Export folds BN into each conv with its running statistics (what the QAT module computes in
  eval mode), keeps the learned fake quants frozen, and traces with the TorchScript exporter,
  which writes QuantizeLinear/DequantizeLinear. An unfolded export keeps float Conv+Div+BN (slower
  than FP32). A small ONNX pass then stores weights as int8 (the file shrinks ~3x) and biases as
  int32 (scale = input x weight scale, the standard QDQ conv, as quantize_static writes it), and
  makes per-tensor scales scalars, without which ORT's fused QLinearAdd refuses to load.
  `int8_kernel_report` checks what ORT really runs: the op types of its optimized graph.
* Checkpoint = the QAT state_dict (scales and observer state are buffers, so `weights_only`
  loading works) + the FP32 arch + params["backend"]; `load_qat_model` rebuilds it (build_model
  -> prepare_qat_model -> load_state_dict). BN-freeze flags are not saved: re-apply the epoch
  hook to train further. The deployable artifact is the ONNX file.
* `eager_ptq_int8` is PyTorch's own static PTQ (the backend's default qconfig): the baseline.
"""

import copy
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
from onnx import helper, numpy_helper
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import (DeQuantStub, FakeQuantize,
                                   MovingAverageMinMaxObserver,
                                   MovingAveragePerChannelMinMaxObserver, QConfig, QuantStub,
                                   disable_observer, enable_observer)
from torchvision.models.quantization.resnet import QuantizableBasicBlock, QuantizableBottleneck
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_slim.errors import UserError
from resnet_slim.export import export_onnx, make_session
from resnet_slim.io import atomic_path
from resnet_slim.models import ResNet, build_model

# x86 int8 kernels without VNNI (fbgemm's, and ORT's MLAS) add pairs of u8 x s8 products in int16
# (VPMADDUBSW), which saturates: 2 x 255 x 128 > 32767. Like torch's x86/fbgemm qconfigs we give up
# one bit, but on the weights, as ORT's `reduce_range` does (2 x 255 x 64 fits), so activations
# keep the full uint8 range. qnnpack (ARM) has no such limit.
WEIGHT_RANGE = {"x86": (-64, 63), "fbgemm": (-64, 63), "qnnpack": (-128, 127),
                "onednn": (-128, 127)}


def qat_qconfig(backend: str) -> QConfig:
    """uint8 per-tensor activations (full range), int8 per-channel symmetric weights."""
    low, high = WEIGHT_RANGE[backend]
    return QConfig(
        activation=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0,
                                          quant_max=255, dtype=torch.quint8,
                                          qscheme=torch.per_tensor_affine),
        weight=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                      quant_min=low, quant_max=high, dtype=torch.qint8,
                                      qscheme=torch.per_channel_symmetric, ch_axis=0))


FLOAT_CONVS = {"Conv", "FusedConv", "NhwcConv", "NhwcFusedConv"}  # any domain (nchwc too)
INT8_CONVS = {"QLinearConv", "NhwcQLinearConv", "ConvInteger"}


class QuantReady(nn.Module):
    """QuantStub -> ResNet -> DeQuantStub. In eval mode the fake quants stop observing: they
    observe whenever enabled, even in eval, so validation would otherwise move the ranges."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.quant, self.net, self.dequant = QuantStub(), net, DeQuantStub()
        self.register_buffer("observers_frozen", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.net(self.quant(x)))

    def train(self, mode: bool = True):
        super().train(mode)
        self.apply(enable_observer if mode and not self.observers_frozen else disable_observer)
        return self


def _check_backend(backend: str) -> None:
    if backend not in torch.backends.quantized.supported_engines or backend not in WEIGHT_RANGE:
        raise UserError(f"quantization backend {backend!r} is not in this torch build "
                        f"(available: {torch.backends.quantized.supported_engines})")


def _quantizable(model_fp32: nn.Module, *, train: bool) -> QuantReady:
    """A fused, stub-wrapped copy; blocks get the Quantizable* class (same parameters)."""
    net = copy.deepcopy(model_fp32)
    groups = [["conv1", "bn1", "relu"]]
    for name, block in net.named_modules():
        if type(block) is BasicBlock:
            block.__class__ = QuantizableBasicBlock
            block.add_relu = FloatFunctional()
            groups += [[f"{name}.conv1", f"{name}.bn1", f"{name}.relu"],
                       [f"{name}.conv2", f"{name}.bn2"]]
        elif type(block) is Bottleneck:
            block.__class__ = QuantizableBottleneck
            block.skip_add_relu, block.relu1, block.relu2 = FloatFunctional(), nn.ReLU(), nn.ReLU()
            groups += [[f"{name}.conv{i}", f"{name}.bn{i}", f"{name}.relu{i}"] for i in (1, 2)]
            groups += [[f"{name}.conv3", f"{name}.bn3"]]
        else:
            continue
        if block.downsample is not None:
            groups.append([f"{name}.downsample.0", f"{name}.downsample.1"])
    if len(groups) == 1:
        raise UserError(f"{type(model_fp32).__name__} has no torchvision ResNet blocks to quantize")
    fuse = torch.ao.quantization.fuse_modules_qat if train else torch.ao.quantization.fuse_modules
    return QuantReady(fuse(net.train(train), groups)).train(train)  # (new ReLUs included)


def prepare_qat_model(model_fp32: nn.Module, *, backend: str = "x86") -> QuantReady:
    """A fake-quant copy of an FP32 ResNet (pruned or not), ready for calibration and training."""
    if not isinstance(model_fp32, ResNet):
        raise UserError(f"QAT supports the ResNet family; got {type(model_fp32).__name__} "
                        f"(quantize it with the ptq stage: onnxruntime static INT8)")
    _check_backend(backend)
    model = _quantizable(model_fp32, train=True)
    model.qconfig = qat_qconfig(backend)
    torch.ao.quantization.prepare_qat(model, inplace=True)
    return model


def load_qat_model(checkpoint: dict) -> QuantReady:
    """Rebuild a QAT model saved by stages/qat.py (FP32 arch + QAT state_dict + backend)."""
    model = prepare_qat_model(build_model(checkpoint["arch"]),
                              backend=checkpoint["params"]["backend"])
    model.load_state_dict(checkpoint["state_dict"])
    return model


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> None:
    """Initialise the observers (activation ranges, weight scales) on normalised images.

    Runs in eval mode, so BN running statistics stay those of the FP32 model.
    """
    if len(images) == 0:
        raise UserError("QAT calibration set is empty: need at least one training image to "
                        "initialise the activation ranges")
    was_training = model.training
    model.eval()
    model.apply(enable_observer)
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size])
    model.train(was_training)


def qat_epoch_hook(*, freeze_bn_epoch: int, freeze_observer_epoch: int
                   ) -> Callable[[nn.Module, int], None]:
    """engine.fit's on_epoch_start: from these (0-based) epochs on, BN uses its running statistics
    and the quantization ranges stop moving, so the last epochs train against the final grid."""
    def hook(model: nn.Module, epoch: int) -> None:
        if epoch >= freeze_bn_epoch:
            model.apply(nniqat.freeze_bn_stats)
        if epoch >= freeze_observer_epoch:
            model.observers_frozen.fill_(True)
            model.apply(disable_observer)
    return hook


# ---------------------------------------------------------------- export

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
        self.conv_args = None if isinstance(layer, nn.Linear) else (
            layer.stride, layer.padding, layer.dilation, layer.groups)
        self.relu = isinstance(layer, (nniqat.ConvBnReLU2d, nniqat.ConvReLU2d, nniqat.LinearReLU))
        self.activation_post_process = layer.activation_post_process

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.fake_quantize_per_channel_affine(self.weight, self.scale, self.zero_point, 0,
                                                   -128, 127)
        y = (nn.functional.linear(x, w, self.bias) if self.conv_args is None
             else nn.functional.conv2d(x, w, self.bias, *self.conv_args))
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
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _Frozen(module))
    return model


def export_qat_onnx(qat_model: nn.Module, path: str | Path, *, image_size: int,
                    opset: int = 17) -> None:
    """Write the QAT model as an INT8 QDQ ONNX file (BN folded, int8 weights, int32 biases)."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        raw = Path(tmp_dir) / "fakequant.onnx"
        export_onnx(_folded_copy(qat_model), raw, image_size=image_size, opset=opset)
        model = onnx.load(str(raw))
    _store_int8(model.graph)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)


def _store_int8(graph: onnx.GraphProto) -> None:
    """Turn QuantizeLinear of constant weights into int8 initializers, give every Conv/Gemm fed by
    DequantizeLinear an int32 bias, drop the float copies, make per-tensor scales scalars."""
    qdq = ("QuantizeLinear", "DequantizeLinear")
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant"})
    # the exporter shares equal initializers through Identity nodes: read them directly
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in values}
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]
    producer = {out: n for n in graph.node for out in n.output}
    new, bias_nodes = {}, []
    for node in list(graph.node):
        if node.op_type == "QuantizeLinear" and node.input[0] in values:  # a weight (axis 0)
            w, scale, zp = (values[name] for name in node.input)
            shape = [-1] + [1] * (w.ndim - 1) if scale.size > 1 else [1] * w.ndim
            q = np.rint(w / scale.reshape(shape)) + zp.reshape(shape)
            info = np.iinfo(zp.dtype)
            new[node.output[0]] = q.clip(info.min, info.max).astype(zp.dtype)
            graph.node.remove(node)
        elif node.op_type in ("Conv", "Gemm") and len(node.input) == 3 and node.input[2] in values:
            x_dq, w_dq = (producer.get(name) for name in node.input[:2])
            if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
                continue
            bias = values[node.input[2]]
            scale = np.broadcast_to(values[x_dq.input[1]] * values[w_dq.input[1]], bias.shape)
            q = np.rint(bias / scale)
            if np.abs(q).max(initial=0) > 2**31 - 1:  # a (near-)zero weight channel with a bias
                warnings.warn(f"{node.name}: int32 bias clipped; check the exported accuracy")
            name = f"{node.output[0]}_bias"  # per node: equal float biases may share one tensor
            new.update({f"{name}_int32": q.clip(1 - 2**31, 2**31 - 1).astype(np.int32),
                        f"{name}_scale": scale.astype(np.float32),
                        f"{name}_zero_point": np.zeros(bias.shape, np.int32)})
            bias_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int32", f"{name}_scale",
                                               f"{name}_zero_point"], [f"{name}_dq"], axis=0))
            node.input[2] = f"{name}_dq"
    for node in bias_nodes:
        graph.node.insert(0, node)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in new.items())
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type in ("Constant", "Identity")]:
        if node.output[0] not in used:
            graph.node.remove(node)
    used = {name for n in graph.node for name in n.input}
    others = {name for n in graph.node if n.op_type not in qdq for name in n.input}
    for tensor in list(graph.initializer):
        if tensor.name not in used:
            graph.initializer.remove(tensor)
        elif tensor.name not in others and list(tensor.dims) == [1]:
            # ORT's QLinearAdd (the fused residual add) wants scalar scales and zero points
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).reshape(()),
                                                    tensor.name))


def int8_kernel_report(onnx_path: str | Path, *, threads: int = 1) -> dict:
    """What ORT really runs: op types of its optimized graph, float vs int8 conv kernels."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        optimized = Path(tmp_dir) / "optimized.onnx"
        make_session(onnx_path, threads=threads, optimized_model_path=optimized)
        graph = onnx.load(str(optimized)).graph
    ops = Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                  for n in graph.node)
    float_convs = sum(c for op, c in ops.items() if op.rpartition(":")[2] in FLOAT_CONVS)
    int8_convs = sum(c for op, c in ops.items() if op.rpartition(":")[2] in INT8_CONVS)
    return {"op_types": dict(sorted(ops.items())), "float_convs": float_convs,
            "int8_convs": int8_convs, "all_convs_int8": float_convs == 0 and int8_convs > 0}


# ---------------------------------------------------------------- PyTorch eager PTQ baseline

@torch.no_grad()
def eager_ptq_int8(model_fp32: nn.Module, calibration_images: torch.Tensor, *,
                   backend: str = "x86", batch_size: int = 64) -> nn.Module:
    """PyTorch static PTQ: fuse, the backend's default qconfig, calibrate, convert (int8 CPU)."""
    _check_backend(backend)
    if len(calibration_images) == 0:
        raise UserError("PTQ calibration set is empty")
    # process-global: weights are packed for this engine at convert time and must match at run time
    torch.backends.quantized.engine = backend
    model = _quantizable(model_fp32, train=False)
    model.qconfig = torch.ao.quantization.get_default_qconfig(backend)
    torch.ao.quantization.prepare(model, inplace=True)
    for start in range(0, len(calibration_images), batch_size):
        model(calibration_images[start:start + batch_size])
    return torch.ao.quantization.convert(model, inplace=True)


@torch.inference_mode()
def torch_latency_ms(model: nn.Module, image: torch.Tensor, *, threads: int = 1,
                     warmup: int = 50, runs: int = 300) -> dict:
    """Latency percentiles of `model(image)` in ms (the statistics of bench.latency_ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        for _ in range(warmup):
            model(image)
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            model(image)
            times[i] = (time.perf_counter() - start) * 1000.0
    finally:
        torch.set_num_threads(previous)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(times.mean())}
