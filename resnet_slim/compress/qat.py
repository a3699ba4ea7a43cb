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
* Export (resnet_slim/compress/qat_export.py) folds BN into each conv and writes a QDQ ONNX file
  with int8 weights, accepted only if ORT runs every conv as an int8 kernel and agrees with the
  PyTorch QAT model.
* Checkpoint = the QAT state_dict (scales and observer state are buffers, so `weights_only`
  loading works) + the FP32 arch + params["backend"]; `load_qat_model` rebuilds it (build_model
  -> prepare_qat_model -> load_state_dict). BN-freeze flags are not saved: re-apply the epoch
  hook to train further. The deployable artifact is the ONNX file.
* `eager_ptq_int8` is PyTorch's own static PTQ (the backend's default qconfig): the baseline.
"""

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.ao.nn.intrinsic.qat as nniqat
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

from resnet_slim.compress.qat_export import export_qat_checked
from resnet_slim.compress.quant import calibration_images
from resnet_slim.data.loader import normalized_split
from resnet_slim.errors import UserError
from resnet_slim.params import BaseParams, QatParams
from resnet_slim.train import distributed, engine
from resnet_slim.train.architectures import ResNet
from resnet_slim.train.models import build_model

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
    checkpoint_path,
    data_dir,
    p: QatParams,
    base: BaseParams,
    device,
    *,
    opset: int,
    onnx_path,
    live_dir,
) -> tuple[nn.Module, dict, dict] | None:
    """The qat stage's work on this rank: train (every rank), then on rank 0 export the INT8 ONNX
    to `onnx_path` and check it. Returns (QAT model, architecture record, metrics) on rank 0, None
    on the others; the stage writes the checkpoint and metrics (metrics["problems"]: rejected)."""
    from resnet_slim.data.loader import load_meta
    from resnet_slim.train.models import load_model

    # the same seed on every rank (DDP then starts every rank from rank 0's weights anyway)
    engine.seed_everything(base.seed, distributed.threads_per_process(base.threads))
    fp32, checkpoint = load_model(
        checkpoint_path, num_classes=len(load_meta(data_dir)["class_names"])
    )
    model, history = train_qat(fp32, data_dir, p, base=base, device=device, live_dir=live_dir)
    if not distributed.is_main_process():
        return None  # rank 0 exports and checks, once
    images, labels = normalized_split(data_dir, "test")
    metrics = export_qat_checked(
        model,
        onnx_path,
        images,
        labels,
        opset=opset,
        threads=base.threads,
        min_agreement=p.min_agreement,
        val_top1=history[-1]["val_top1"],
        fp32_metrics=checkpoint.get("metrics", {}),
    )
    return model, checkpoint["arch"], metrics
