"""The train_teacher stage's work: build (or import) the teacher, train it with the shared loop.

A model built from teacher.arch/width, or with teacher.init one imported from a file
(resnet_slim/train/model_import.py), evaluated as imported and adapted for teacher.epochs (0: used
as is). The stage script (stages/train_teacher.py) writes what `train_teacher` returns.
"""

import sys
from pathlib import Path

import torch
from torch import nn

from resnet_slim.params import BaseParams, TeacherParams
from resnet_slim.train import distributed
from resnet_slim.train.engine import (
    cross_entropy,
    fit_on,
    rank_loaders,
    seed_everything,
    top1_by_split,
)
from resnet_slim.train.models import build_model, make_arch


def imported_teacher(p, *, num_classes: int, device: torch.device, splits: dict):
    """(model on `device`, architecture record, origin) of teacher.init, with its top-1 as
    imported on each of `splits` recorded in origin and logged (on rank 0)."""
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
    return model, arch, origin


def teacher_metrics(p, history: list[dict], origin: dict | None, model, splits: dict) -> dict:
    """The checkpoint's metrics: final val top-1 and its curve, plus an imported model's origin
    with its top-1 after adaptation (None when it was used as imported)."""
    metrics = {
        "val_top1": history[-1]["val_top1"] if history else origin["top1_as_imported"]["val"],
        "epochs": p.epochs,
        "val_top1_curve": [round(h["val_top1"], 3) for h in history],
    }
    if origin is not None:
        origin["top1_after_adaptation"] = top1_by_split(model, splits) if history else None
        metrics["origin"] = origin
    return metrics


def train_teacher(
    prepared_dir: str | Path,
    *,
    p: TeacherParams,
    base: BaseParams,
    device: torch.device,
    live_dir: str | Path,
) -> tuple[nn.Module, dict, dict]:
    """The train_teacher stage's work: (plain CPU teacher, architecture record, metrics).

    Every process returns the same; the caller writes on rank 0.
    """
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
        model, arch, origin = imported_teacher(
            p, num_classes=num_classes, device=device, splits=splits
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
    metrics = teacher_metrics(p, history, origin, model, splits)
    return (
        distributed.plain_cpu(model),
        arch,
        metrics,
    )  # a plain CPU checkpoint, whatever trained it
