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
import sys
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
from resnet_slim.train import distributed

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

    Returns the per-epoch history. The caller saves the final model (atomically). Under DDP,
    `model` is the wrapped model, the loaders are this rank's shards, and only rank 0 logs.
    `channels_last` trains in NHWC, ~30% faster on CPU for the full-width teacher (ResNet-18,
    32 px, 2 cores); not for pruned models (odd channel counts crashed oneDNN's NHWC kernels in
    a test) and not under DDP (its gradient buckets are laid out when the model is wrapped).
    """
    from dvclive import Live

    # summed over ranks: a rank may hold no validation batch while the split is not empty
    batches = distributed.all_reduce_sum([len(train_loader), len(val_loader)])
    for name, count in zip(("training", "validation"), batches, strict=True):
        if count == 0:
            raise UserError(
                f"{desc}: the {name} split is empty; re-run the prepare stage with "
                f"more images (nothing was saved)"
            )
    channels_last = channels_last and distributed.world_size() == 1
    if channels_last:
        model.to(memory_format=torch.channels_last)  # in place: parameters stay the same objects
    optimizer, scheduler = make_optimizer(model, p, len(train_loader))
    history: list[dict] = []
    saving = _resume(model, optimizer, scheduler, history, train_loader, val_loader, desc=desc)
    # dvcyaml=False: metrics/plots are declared in the repo's dvc.yaml, not generated per run.
    # Under DDP only rank 0 logs (live is None on the others). Not `with Live(...)`: its __exit__
    # calls `Live.end()` after an error or SIGTERM too, and `end()` waits on a queue whose worker
    # thread a signal during `next_step()` may have kept from starting, forever (issue 20). Each
    # `next_step()` has written the metrics so far, so a failed run skips `end()`.
    live = (
        Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        if distributed.is_main_process()
        else None
    )
    for row in history:  # a resumed run's curves continue: the finished epochs are logged again
        _log_epoch(live, row)
    for epoch in range(len(history), p.epochs):
        if on_epoch_start is not None:
            on_epoch_start(model, epoch)
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
        history.append(row)
        if saving is not None:
            saving(epoch + 1)
        _log_epoch(live, row)
        if live is not None:
            print(
                f"{desc} epoch {epoch + 1}/{p.epochs}: train loss {train['loss']:.4f} top-1 "
                f"{train['top1']:.2f}% | val loss {val['loss']:.4f} top-1 {val['top1']:.2f}%"
                f" | {images_per_s:.0f} img/s",
                flush=True,
            )
    if live is not None:
        live.end()
    if channels_last:
        optimizer.zero_grad(set_to_none=True)  # no NHWC gradients left on NCHW weights
        model.to(memory_format=torch.contiguous_format)  # leaves as it came (export, pruning)
    return history


def _log_epoch(live, row: dict) -> None:
    if live is None:
        return
    for key, value in row.items():
        if key != "epoch":
            live.log_metric(key, value)
    live.next_step()


def _resume(model, optimizer, scheduler, history, train_loader, val_loader, *, desc):
    """Inside a stage's `resume.checkpoints`: load this phase's checkpoint when it was written by
    the same work (weights, optimizer, scheduler, history and random state restored in place),
    and return the function that writes one after each epoch; None outside one."""
    from resnet_slim.train import resume

    session = resume.current()
    if session is None:
        return None
    plain = distributed.unwrap(model)
    key = resume.fit_key(
        session, desc=desc, model=plain, train_loader=train_loader, val_loader=val_loader
    )
    path = resume.checkpoint_path(session, desc)
    checkpoint, why = resume.load(path, key)
    # every rank resumes or none does: ranks that disagree on the epoch would deadlock DDP
    ranks_resuming = distributed.all_reduce_sum([int(checkpoint is not None)])[0]
    if checkpoint is not None and ranks_resuming != distributed.world_size():
        checkpoint, why = None, "another process's checkpoint is missing or was discarded"
    if why is not None:
        resume.discard(path, why, desc)
    if checkpoint is not None:
        plain.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history.extend(checkpoint["history"])
        resume.set_random_state(checkpoint["random"], train_loader)
        if distributed.is_main_process():
            print(f"{desc}: resumed after epoch {len(history)} from {path}", flush=True)

    def save_epoch(epochs_done: int) -> None:
        resume.save(
            path,
            {
                "key": key,
                "epochs_done": epochs_done,
                "model": plain.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": list(history),
                "random": resume.random_state(train_loader),
            },
        )

    return save_epoch


def train_teacher(
    prepared_dir: str | Path, *, params, device: torch.device, live_dir: str | Path
) -> tuple[nn.Module, dict, dict]:
    """The train_teacher stage's work: (plain CPU teacher, architecture record, metrics).

    A model built from teacher.arch/width, or with teacher.init one imported from a file,
    evaluated as imported and adapted for teacher.epochs (0: used as is). Every process returns
    the same; the caller writes on rank 0.
    """
    from resnet_slim.train.models import build_model, make_arch

    p, base = params.teacher, params.base
    # the same seed on every rank: every rank builds (and evaluates as imported) the same model
    seed_everything(base.seed, distributed.threads_per_process(base.threads))
    train_loader, val_loader, test_loader, meta = rank_loaders(
        prepared_dir, batch_size=p.batch_size, base=base
    )
    splits = {"val": val_loader, "test": test_loader}
    num_classes = len(meta["class_names"])
    if p.init is None:
        arch = make_arch(
            name=p.arch, num_classes=num_classes, width=p.width, small_input=p.small_input
        )
        model, origin = build_model(arch), None
    else:
        from resnet_slim.train.model_import import import_model, untracked_note

        model, arch, origin = import_model(
            p.init, p.format, num_classes=num_classes, replace_head=p.replace_head
        )
        if (note := untracked_note(origin)) and distributed.is_main_process():
            print(f"teacher: warning: {note}", file=sys.stderr, flush=True)
        model = model.to(device)
        origin["top1_as_imported"] = top1 = top1_by_split(model, splits)
        if distributed.is_main_process():
            print(
                f"teacher: imported {origin['family']} ({origin['format']}) from {p.init}: "
                f"top-1 val {top1['val']:.2f}%, test {top1['test']:.2f}% as imported "
                f"(teacher.arch/width/small_input come from the file)",
                flush=True,
            )
    history = []
    if p.epochs > 0:  # 0 only with teacher.init: the imported model is used as it is
        model, history = fit_on(
            device,
            model,
            train_loader,
            val_loader,
            p,
            sync_bn=base.sync_bn,
            loss_fn=cross_entropy(p.label_smoothing),
            live_dir=live_dir,
            desc="teacher",
            channels_last=True,
        )
    metrics = {
        "val_top1": history[-1]["val_top1"] if history else origin["top1_as_imported"]["val"],
        "epochs": p.epochs,
        "val_top1_curve": [round(h["val_top1"], 3) for h in history],
    }
    if origin is not None:
        origin["top1_after_adaptation"] = top1_by_split(model, splits) if history else None
        metrics["origin"] = origin
    return (
        distributed.plain_cpu(model),
        arch,
        metrics,
    )  # a plain CPU checkpoint, whatever trained it
