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
  than FP32). `onnx_int8.store_int8` then stores int8 weights and int32 biases, and
  `export_qat_checked` accepts the file only if ORT runs every conv as an int8 kernel
  (`onnx_int8.int8_kernel_report`) and its top-1 matches the PyTorch QAT model's.
* Checkpoint = the QAT state_dict (scales and observer state are buffers, so `weights_only`
  loading works) + the FP32 arch + params["backend"]; `load_qat_model` rebuilds it (build_model
  -> prepare_qat_model -> load_state_dict). BN-freeze flags are not saved: re-apply the epoch
  hook to train further. The deployable artifact is the ONNX file.
* `eager_ptq_int8` is PyTorch's own static PTQ (the backend's default qconfig): the baseline.
"""

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import (
    DeQuantStub,
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QuantStub,
    disable_observer,
    enable_observer,
)
from torchvision.models.quantization.resnet import QuantizableBasicBlock, QuantizableBottleneck
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_slim.compress.export import export_onnx, make_session, run_onnx, torch_logits
from resnet_slim.compress.onnx_int8 import int8_kernel_report, store_int8
from resnet_slim.compress.quant import calibration_images
from resnet_slim.data.loader import normalized_split
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path
from resnet_slim.params import BaseParams, QatParams
from resnet_slim.train import distributed, engine
from resnet_slim.train.models import ResNet, build_model, replace_submodule

# x86 int8 kernels without VNNI (fbgemm's, and ORT's MLAS) add pairs of u8 x s8 products in int16
# (VPMADDUBSW), which saturates: 2 x 255 x 128 > 32767. Like torch's x86/fbgemm qconfigs we give up
# one bit, but on the weights, as ORT's `reduce_range` does (2 x 255 x 64 fits), so activations
# keep the full uint8 range. qnnpack (ARM) has no such limit.
WEIGHT_RANGE = {
    "x86": (-64, 63),
    "fbgemm": (-64, 63),
    "qnnpack": (-128, 127),
    "onednn": (-128, 127),
}


def qat_qconfig(backend: str) -> QConfig:
    """uint8 per-tensor activations (full range), int8 per-channel symmetric weights."""
    low, high = WEIGHT_RANGE[backend]
    return QConfig(
        activation=FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        ),
        weight=FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=low,
            quant_max=high,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        ),
    )


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
        raise UserError(
            f"quantization backend {backend!r} is not in this torch build "
            f"(available: {torch.backends.quantized.supported_engines})"
        )


def _quantizable(model_fp32: nn.Module, *, train: bool) -> QuantReady:
    """A fused, stub-wrapped copy; blocks get the Quantizable* class (same parameters)."""
    net = copy.deepcopy(model_fp32)
    groups = [["conv1", "bn1", "relu"]]
    for name, block in net.named_modules():
        if type(block) is BasicBlock:
            block.__class__ = QuantizableBasicBlock
            block.add_relu = FloatFunctional()
            groups += [
                [f"{name}.conv1", f"{name}.bn1", f"{name}.relu"],
                [f"{name}.conv2", f"{name}.bn2"],
            ]
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
        raise UserError(
            f"QAT supports the ResNet family; got {type(model_fp32).__name__} "
            f"(quantize it with the ptq stage: onnxruntime static INT8)"
        )
    _check_backend(backend)
    model = _quantizable(model_fp32, train=True)
    model.qconfig = qat_qconfig(backend)
    torch.ao.quantization.prepare_qat(model, inplace=True)
    return model


def load_qat_model(checkpoint: dict) -> QuantReady:
    """Rebuild a QAT model saved by stages/qat.py (FP32 arch + QAT state_dict + backend)."""
    model = prepare_qat_model(
        build_model(checkpoint["arch"]), backend=checkpoint["params"]["backend"]
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> None:
    """Initialise the observers (activation ranges, weight scales) on normalised images.

    Runs in eval mode, so BN running statistics stay those of the FP32 model.
    """
    if len(images) == 0:
        raise UserError(
            "QAT calibration set is empty: need at least one training image to "
            "initialise the activation ranges"
        )
    was_training = model.training
    model.eval()
    model.apply(enable_observer)
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size])
    model.train(was_training)


def qat_epoch_hook(
    *, freeze_bn_epoch: int, freeze_observer_epoch: int
) -> Callable[[nn.Module, int], None]:
    """engine.fit's on_epoch_start: from these (0-based) epochs on, BN uses its running statistics
    and the quantization ranges stop moving, so the last epochs train against the final grid."""

    def hook(model: nn.Module, epoch: int) -> None:
        model = distributed.unwrap(model)  # under DDP fit passes the wrapper, not the QuantReady
        if epoch >= freeze_bn_epoch:
            model.apply(nniqat.freeze_bn_stats)
        if epoch >= freeze_observer_epoch:
            model.observers_frozen.fill_(True)
            model.apply(disable_observer)

    return hook


def train_qat(
    model_fp32: nn.Module,
    prepared_dir: str | Path,
    p: QatParams,
    *,
    base: BaseParams,
    device: torch.device,
    live_dir: str | Path,
) -> tuple[QuantReady, list[dict]]:
    """(QAT model as a plain CPU module, engine.fit's history): a fake-quant copy calibrated on
    p.calibration_images training images, then trained with the shared loop on `device` (under
    torchrun: this rank's shard, in DDP), BN and then the ranges frozen at p.freeze_bn_epoch /
    p.freeze_observer_epoch. Every process returns the same model."""
    model = prepare_qat_model(model_fp32, backend=p.backend)
    train_images, _ = normalized_split(prepared_dir, "train")
    # the same seeded images on every rank, so every rank starts from the same observer ranges
    # (DDP's construction broadcasts rank 0's buffers anyway)
    calibrate(
        model,
        torch.from_numpy(calibration_images(train_images, p.calibration_images, seed=base.seed)),
    )
    train_loader, val_loader, _, _ = engine.rank_loaders(
        prepared_dir, batch_size=p.batch_size, base=base
    )
    # sync_bn stays off whatever base.sync_bn says: the BNs sit inside torch.ao's fused QAT
    # conv-BN modules (SyncBatchNorm there is untested), and from p.freeze_bn_epoch on they use
    # running statistics; before it each rank normalises over its own share of the batch
    return engine.fit_on(
        device,
        model,
        train_loader,
        val_loader,
        p,
        sync_bn=False,
        loss_fn=engine.cross_entropy(p.label_smoothing),
        live_dir=live_dir,
        desc="qat",
        on_epoch_start=qat_epoch_hook(
            freeze_bn_epoch=p.freeze_bn_epoch, freeze_observer_epoch=p.freeze_observer_epoch
        ),
    )


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


# ---------------------------------------------------------------- PyTorch eager PTQ baseline


@torch.no_grad()
def eager_ptq_int8(
    model_fp32: nn.Module, calibration: torch.Tensor, *, backend: str = "x86", batch_size: int = 64
) -> nn.Module:
    """PyTorch static PTQ: fuse, the backend's default qconfig, calibrate, convert (int8 CPU)."""
    _check_backend(backend)
    if len(calibration) == 0:
        raise UserError("PTQ calibration set is empty")
    # process-global: weights are packed for this engine at convert time and must match at run time
    torch.backends.quantized.engine = backend
    model = _quantizable(model_fp32, train=False)
    model.qconfig = torch.ao.quantization.get_default_qconfig(backend)
    torch.ao.quantization.prepare(model, inplace=True)
    for start in range(0, len(calibration), batch_size):
        model(calibration[start : start + batch_size])
    return torch.ao.quantization.convert(model, inplace=True)


def quantize_checkpoint(
    checkpoint_path, data_dir, params, device, *, onnx_path, out, reports
) -> None:
    """The qat stage on this rank: train (every rank), then on rank 0 export the INT8 ONNX, check
    it (rejected: deleted, a UserError) and write the QAT checkpoint and metrics."""
    from resnet_slim.data.loader import load_meta
    from resnet_slim.io import save_checkpoint, write_json
    from resnet_slim.train.models import load_model

    p, base = params.qat, params.base
    # the same seed on every rank (DDP then starts every rank from rank 0's weights anyway)
    engine.seed_everything(base.seed, distributed.threads_per_process(base.threads))
    fp32, checkpoint = load_model(
        checkpoint_path, num_classes=len(load_meta(data_dir)["class_names"])
    )
    model, history = train_qat(
        fp32, data_dir, p, base=base, device=device, live_dir=f"{reports}/live"
    )
    if not distributed.is_main_process():
        return  # rank 0 exports, checks and writes the outputs, once
    images, labels = normalized_split(data_dir, "test")
    metrics = export_qat_checked(
        model,
        onnx_path,
        images,
        labels,
        opset=params.export.opset,
        threads=base.threads,
        min_agreement=p.min_agreement,
        val_top1=history[-1]["val_top1"],
        fp32_metrics=checkpoint.get("metrics", {}),
    )
    write_json(f"{reports}/metrics.json", metrics)
    if metrics["problems"]:
        Path(onnx_path).unlink()
        raise UserError(f"{onnx_path}: QAT export rejected: {'; '.join(metrics['problems'])}")
    save_checkpoint(
        out, model=model, arch=checkpoint["arch"], params=p.model_dump(), metrics=metrics
    )
    print(
        f"qat: PyTorch top-1 {metrics['torch_top1']:.2f}%, ONNX top-1 "
        f"{metrics['onnx_top1']:.2f}%, {metrics['kernels']['int8_convs']} int8 convs "
        f"-> {onnx_path}"
    )
