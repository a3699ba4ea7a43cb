"""The one training loop, shared by teacher training, fine-tuning, QAT and distillation.

What differs between those is passed in: the loss (`loss_fn(model, images, targets) -> (loss,
logits)`, so it may run the forward its own way: cross-entropy, or distillation that also needs
student features and a teacher), a hook that runs between `backward()` and `step()` (network
slimming's L1 on BN gamma), and a per-epoch hook (freezing observers / BN statistics in QAT).

Under torchrun the same loop runs in every worker on a DDP-wrapped model
(resnet_slim/train/distributed.py): each rank trains on its shard, loss/top-1 are summed over ranks
so every rank sees the same numbers, and only rank 0 logs. In one process those sums are skipped and
nothing changes. `rank_loaders` / `eval_loader` give this rank's shards, `fit_on` wraps a model for
its device and hands back a plain CPU model: what every training stage uses.
"""

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from resnet_slim.data import loader as data
from resnet_slim.errors import UserError
from resnet_slim.params import BaseParams, TrainParams
from resnet_slim.train import distributed, resume
from resnet_slim.train.epoch_log import log_epoch, open_live, print_epoch

LossFn = Callable[[nn.Module, torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]


def kd_logit_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """α·T²·KL(p_t^T ‖ p_s^T) + (1−α)·CE(s, y)."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"distill.alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise UserError(f"distill.temperature must be > 0, got {temperature}")
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _labels(targets) -> torch.Tensor:
    """Targets are labels, or a tuple whose first item is the labels (extras: cached logits)."""
    return targets[0] if isinstance(targets, tuple) else targets


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's weights are (loaders yield CPU tensors; a no-op move on CPU)."""
    param = next(model.parameters(), None)  # converted INT8 models have packed weights only
    return param.device if param is not None else torch.device("cpu")


def _to(device: torch.device, targets):
    return (
        tuple(t.to(device) for t in targets) if isinstance(targets, tuple) else targets.to(device)
    )


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's conv weights are (fit() sets it), so inputs match."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if (
        conv is not None
        and conv.weight.is_contiguous(memory_format=torch.channels_last)
        and not conv.weight.is_contiguous()
    ):
        return torch.channels_last
    return torch.contiguous_format


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(
        model: nn.Module, images: torch.Tensor, targets
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        loss = nn.functional.cross_entropy(
            logits, _labels(targets), label_smoothing=label_smoothing
        )
        return loss, logits

    return loss_fn


def make_optimizer(model: nn.Module, p: TrainParams, steps_per_epoch: int):
    """SGD + nesterov with linear warm-up then cosine decay, stepped every batch."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # no weight decay on BN / biases (1-D): it would fight network slimming's own L1
            (no_decay if param.ndim <= 1 else decay).append(param)
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": p.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=p.lr,
        momentum=p.momentum,
        nesterov=p.momentum > 0,
    )
    total = max(1, p.epochs * steps_per_epoch)
    warmup = int(p.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer,
    loss_fn: LossFn,
    *,
    scheduler=None,
    after_backward: Callable[[nn.Module], None] | None = None,
    epoch: int = 0,
    desc: str = "train",
) -> dict:
    model.train()
    device = _device_of(model)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(
        loader,
        desc=f"{desc} epoch {epoch + 1}",
        leave=False,
        disable=None if distributed.is_main_process() else True,
    )
    memory_format = _memory_format(model)
    for step, (images, targets) in enumerate(bar):
        images, targets = images.to(device, memory_format=memory_format), _to(device, targets)
        loss, logits = loss_fn(model, images, targets)
        if not torch.isfinite(loss):
            raise UserError(
                f"{desc}: loss became {loss.item()} at epoch {epoch + 1}, step "
                f"{step + 1}; lower the learning rate (nothing was saved)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = len(images)
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == _labels(targets)).sum().item()
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    total_loss, correct, seen = distributed.all_reduce_sum([total_loss, correct, seen])
    return {"loss": total_loss / seen, "top1": 100.0 * correct / seen, "images": seen}


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (on the CPU) and labels of a loader, in order."""
    model.eval()
    device = _device_of(model)
    logits, labels = [], []
    for images, targets in loader:
        logits.append(model(images.to(device)).cpu())
        labels.append(_labels(targets))
    if not logits:  # a rank's evaluation shard is empty when a split has fewer images than ranks
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader) -> dict:
    logits, labels = predict(model, loader)
    if distributed.world_size() == 1:
        return {
            "loss": nn.functional.cross_entropy(logits, labels).item(),
            "top1": 100.0 * (logits.argmax(1) == labels).float().mean().item(),
        }
    # each rank saw its shard of the split: add up sums and counts over ranks
    sums = (
        [
            nn.functional.cross_entropy(logits, labels, reduction="sum").item(),
            (logits.argmax(1) == labels).sum().item(),
        ]
        if len(labels)
        else [0.0, 0]
    )
    loss_sum, correct, count = distributed.all_reduce_sum([*sums, len(labels)])
    return {"loss": loss_sum / count, "top1": 100.0 * correct / count}


def top1_by_split(model: nn.Module, loaders: dict) -> dict[str, float]:
    """{split: top-1 in %, rounded to 3 decimals} of `model` on each named loader."""
    return {split: round(evaluate(model, loader)["top1"], 3) for split, loader in loaders.items()}


def rank_loaders(prepared_dir: str | Path, *, batch_size: int, base: BaseParams):
    """(train, val, test loaders, meta): this process's shards (all of each split in one process).

    Train: shuffled, augmented, padded so every rank takes the same number of steps, `batch_size`
    split over the ranks. Val / test: unpadded shards that `evaluate` sums over ranks.
    """
    train, val, meta = data.train_val_loaders(
        prepared_dir,
        batch_size=batch_size,
        augment=base.augment,
        seed=base.seed,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    return train, val, eval_loader(prepared_dir, "test", meta), meta


def eval_loader(prepared_dir: str | Path, split: str, meta: dict):
    """This process's unpadded share of a split, in order, batches of 256, for `evaluate`."""
    pixels = data.load_split(prepared_dir, split)
    return data.BatchLoader(
        pixels.images,
        pixels.labels,
        meta=meta,
        batch_size=256,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        pad=False,
    )


def fit_on(
    device: torch.device,
    model: nn.Module,
    train_loader,
    val_loader,
    p: TrainParams,
    *,
    sync_bn: bool = False,
    **fit_kwargs,
) -> tuple[nn.Module, list[dict]]:
    """`fit` on `device`, in DDP under torchrun (`distributed.wrap_model`); returns the trained
    model as a plain CPU module (`distributed.plain_cpu`) and the history. In one CPU process the
    model itself is trained and returned, exactly as `fit(model, ...)`."""
    wrapped = distributed.wrap_model(model, device, sync_bn=sync_bn)
    history = fit(wrapped, train_loader, val_loader, p, **fit_kwargs)
    return distributed.plain_cpu(wrapped), history


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    p: TrainParams,
    *,
    loss_fn: LossFn,
    live_dir: str | Path,
    desc: str,
    after_backward: Callable[[nn.Module], None] | None = None,
    on_epoch_start: Callable[[nn.Module, int], None] | None = None,
    channels_last: bool = False,
) -> list[dict]:
    """Train for `p.epochs`, evaluating on `val_loader` after each epoch; log with DVCLive.

    Returns the per-epoch history; the caller saves the final model (atomically). Under DDP,
    `model` is the wrapped model, the loaders are this rank's shards, and only rank 0 logs.
    `channels_last`: train in NHWC where it helps (see `_start_channels_last`)."""
    _check_not_empty(train_loader, val_loader, desc=desc)
    channels_last = _start_channels_last(model, channels_last)
    optimizer, scheduler = make_optimizer(model, p, len(train_loader))
    history: list[dict] = []
    saving = resume.epoch_checkpoints(
        model, optimizer, scheduler, history, train_loader, val_loader, desc=desc
    )
    live = open_live(live_dir, history)
    for epoch in range(len(history), p.epochs):
        if on_epoch_start is not None:
            on_epoch_start(model, epoch)
        row, images_per_s = _train_and_validate(
            model,
            train_loader,
            val_loader,
            optimizer,
            scheduler,
            loss_fn,
            after_backward=after_backward,
            epoch=epoch,
            desc=desc,
        )
        history.append(row)
        if saving is not None:
            saving(epoch + 1)
        log_epoch(live, row)
        print_epoch(live, row, epochs=p.epochs, images_per_s=images_per_s, desc=desc)
    if live is not None:
        live.end()
    if channels_last:
        _end_channels_last(model, optimizer)
    return history


def _start_channels_last(model: nn.Module, requested: bool) -> bool:
    """Whether `fit` trains in NHWC, converting `model` in place if so: ~30% faster on CPU for
    the full-width teacher (ResNet-18, 32 px, 2 cores); not for pruned models (odd channel counts
    crashed oneDNN's NHWC kernels in a test) and not under DDP (its gradient buckets are laid out
    when the model is wrapped)."""
    channels_last = requested and distributed.world_size() == 1
    if channels_last:
        model.to(memory_format=torch.channels_last)  # in place: parameters stay the same objects
    return channels_last


def _end_channels_last(model: nn.Module, optimizer) -> None:
    """Back to NCHW, as the model came (export and pruning expect it)."""
    optimizer.zero_grad(set_to_none=True)  # no NHWC gradients left on NCHW weights
    model.to(memory_format=torch.contiguous_format)  # leaves as it came (export, pruning)


def _check_not_empty(train_loader, val_loader, *, desc: str) -> None:
    """An empty split is one clear error before any work, not a division by zero after it."""
    # summed over ranks: a rank may hold no validation batch while the split is not empty
    batches = distributed.all_reduce_sum([len(train_loader), len(val_loader)])
    for name, count in zip(("training", "validation"), batches, strict=True):
        if count == 0:
            raise UserError(
                f"{desc}: the {name} split is empty; re-run the prepare stage with "
                f"more images (nothing was saved)"
            )


def _train_and_validate(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer,
    scheduler,
    loss_fn: LossFn,
    *,
    after_backward: Callable[[nn.Module], None] | None,
    epoch: int,
    desc: str,
) -> tuple[dict, float]:
    """One epoch: train, then evaluate the model every rank now holds. Returns the history row
    and the training speed (images per second, all ranks together)."""
    started = time.perf_counter()
    train = train_one_epoch(
        model,
        train_loader,
        optimizer,
        loss_fn,
        scheduler=scheduler,
        after_backward=after_backward,
        epoch=epoch,
        desc=desc,
    )
    images_per_s = train["images"] / (time.perf_counter() - started)  # all ranks together
    distributed.sync_buffers(model)  # every rank evaluates (and rank 0 saves) one model
    val = evaluate(distributed.unwrap(model), val_loader)
    row = {
        "epoch": epoch + 1,
        "train_loss": train["loss"],
        "train_top1": train["top1"],
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "lr": optimizer.param_groups[0]["lr"],
    }
    return row, images_per_s
