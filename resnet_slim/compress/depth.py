"""Depth pruning: remove whole residual blocks of a ResNet.

A block whose shortcut is the identity (no downsample: stride 1, as many channels out as in)
computes relu(x + F(x)); taking it out leaves x, so every shape stays and the other blocks keep
their trained weights. Residual networks lose little when one such block goes (Veit et al. 2016,
arXiv:1605.06431); which ones cost least is measured on held-out images by
`block_removal_costs`. `remove_blocks` builds the shallower model and its architecture record
(`arch["blocks"]`, resnet_slim/train/models.py), from which a checkpoint rebuilds it.

Removable (`removable_blocks`): a BasicBlock / Bottleneck without downsample and with stride 1, in
a stage of two or more blocks. The first block of a stage with a strided or widening shortcut is
never removable; one without (CifarResNet's and ResNet-18/34's layer1.0) is, like any other, as
long as one block is left in the stage: the builder makes a stage's first block from the same
shapes, so the record still describes the model.
"""

import copy
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_slim.errors import UserError
from resnet_slim.train.architectures import ARCHS, CifarResNet, ResNet, freeze_shortcuts
from resnet_slim.train.model_bounds import record_blocks

# "layer2.5" and what follows it ("layer2.5.conv1"): a block's name in module and record names
_BLOCK_NAME = re.compile(r"(layer\d+\.\d+)(\..*)?")


def removable_blocks(model: nn.Module) -> list[str]:
    """Names ("layer2.3") of the blocks that can go without changing any shape, in model order."""
    return [
        f"{stage_name}.{index}"
        for stage_name, stage in _stages(model).items()
        for index, block in enumerate(stage)
        if _keeps_shape(block) and len(stage) > 1
    ]


def mean_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256
) -> float:
    """Mean cross-entropy of `model` on (images, labels), in eval mode, without gradients; the
    model's train/eval flags are left as they were."""
    _check_data(images, labels, batch_size)
    with _evaluating(model):
        return _mean_loss(model, images, labels, batch_size)


def block_removal_costs(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256
) -> dict[str, float]:
    """{removable block: increase of the mean cross-entropy on (images, labels) when that block
    alone is bypassed}, in model order.

    Bypassing swaps the block for nn.Identity (its output is its input) and puts it back, so the
    model is left exactly as it was. Eval mode, no gradients: deterministic for the same data.
    A cost can be negative (the block hurt); math.inf where the bypassed model's loss is not
    finite. The base loss is `mean_loss`.
    """
    _check_data(images, labels, batch_size)
    stages, names = _stages(model), removable_blocks(model)
    costs = {}
    with _evaluating(model):
        base = _mean_loss(model, images, labels, batch_size)
        if not math.isfinite(base):
            raise UserError(f"the model's loss on these images is {base}; it cannot be ranked")
        for name in names:
            stage_name, index = name.rsplit(".", 1)
            stage, index = stages[stage_name], int(index)
            block = stage[index]
            stage[index] = nn.Identity()
            try:
                loss = _mean_loss(model, images, labels, batch_size)
            finally:
                stage[index] = block
            costs[name] = loss - base if math.isfinite(loss) else math.inf
    return costs


def remove_blocks(model: nn.Module, arch: dict, names: Iterable[str]) -> tuple[nn.Module, dict]:
    """(a copy of `model` without the named blocks, its architecture record). `model` and `arch`
    (the model's own record) are not modified.

    The other blocks keep their weights and BN statistics and are renumbered in order (layer2.0,
    layer2.1, ...); the record gets `blocks` and its per-layer entries (`channels`, `lowrank`)
    renamed to match, so `build_model(record)` + `load_state_dict` is the same model.
    """
    stages = _stages(model)
    counts = [len(stage) for stage in stages.values()]
    if not _describes(arch, model, counts):
        raise UserError(
            f"the architecture record {str(arch)[:120]} does not describe this "
            f"{type(model).__name__} with {counts} blocks per stage"
        )
    doomed = _checked_names(model, names)
    kept = {
        stage_name: [i for i in range(len(stage)) if f"{stage_name}.{i}" not in doomed]
        for stage_name, stage in stages.items()
    }
    pruned = copy.deepcopy(model)
    for stage_name, stage in _stages(pruned).items():
        for index in reversed(range(len(stage))):
            if f"{stage_name}.{index}" in doomed:
                del stage[index]  # nn.Sequential renumbers the rest from 0
    freeze_shortcuts(pruned)
    renames = {
        f"{stage_name}.{old}": f"{stage_name}.{new}"
        for stage_name, indices in kept.items()
        for new, old in enumerate(indices)
    }
    record = copy.deepcopy(arch)
    record["blocks"] = [len(indices) for indices in kept.values()]
    for key in ("channels", "lowrank"):
        if isinstance(record.get(key), dict):
            record[key] = _renamed(record[key], renames)
    return pruned, record


def _stages(model: nn.Module) -> dict[str, nn.Sequential]:
    """{"layer1": its blocks, ...} of a ResNet (three stages for CifarResNet, else four)."""
    if not isinstance(model, ResNet):
        raise UserError(
            f"depth pruning removes residual blocks of a ResNet; a {type(model).__name__} has none"
        )
    count = 3 if isinstance(model, CifarResNet) else 4
    return {f"layer{i}": getattr(model, f"layer{i}") for i in range(1, count + 1)}


def _describes(arch, model: ResNet, counts: list[int]) -> bool:
    """Whether `arch` is a record of `model`'s architecture with its blocks per stage."""
    if not isinstance(arch, dict):
        return False
    name = arch.get("name")
    if isinstance(model, CifarResNet):
        same = name == "cifar_resnet"
    else:
        same = isinstance(name, str) and name in ARCHS and type(model.layer1[0]) is ARCHS[name][0]
    return same and record_blocks(arch) == counts


def _keeps_shape(block: nn.Module) -> bool:
    """Whether the block's output has its input's shape: identity shortcut, stride 1."""
    return (
        isinstance(block, (BasicBlock, Bottleneck))
        and block.downsample is None
        and block.stride == 1
    )


def _checked_names(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The names as a set, each a removable block, leaving every stage at least one block."""
    names = [names] if isinstance(names, str) else list(names)
    stages, removable = _stages(model), set(removable_blocks(model))
    for name in names:
        found = _BLOCK_NAME.fullmatch(name) if isinstance(name, str) and len(name) < 40 else None
        if found is None or found.group(2):
            raise UserError(f"{str(name)[:60]!r} is not a block name like 'layer2.1'")
        stage_name, index = name.split(".")
        stage = stages.get(stage_name)
        if stage is None or int(index) >= len(stage):
            raise UserError(f"this {type(model).__name__} has no residual block {name!r}")
        if name not in removable:
            why = (
                f"the only block of {stage_name}"
                if len(stage) == 1
                else "its stride or shortcut changes the shape"
            )
            raise UserError(f"block {name!r} cannot be removed: {why}")
    for stage_name, stage in stages.items():
        if all(f"{stage_name}.{i}" in names for i in range(len(stage))):
            raise UserError(
                f"removing every block of {stage_name} ({len(stage)}) would leave it empty; "
                f"every stage keeps at least one"
            )
    return set(names)


def _renamed(entries: dict, renames: dict[str, str]) -> dict:
    """A per-layer record ({"layer2.5.conv1": ...}) in the new block numbering: a surviving
    block's entries move to its new index, a removed block's are dropped, others stay."""
    renamed = {}
    for key, value in entries.items():
        found = _BLOCK_NAME.fullmatch(key) if isinstance(key, str) else None
        if found is None:
            renamed[key] = value
        elif found.group(1) in renames:
            renamed[renames[found.group(1)] + (found.group(2) or "")] = value
    return renamed


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every module's own train/eval flag restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _mean_loss(model: nn.Module, images, labels, batch_size: int) -> float:
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
            raise UserError(
                f"labels must be class indices 0..{logits.shape[1] - 1}, got "
                f"{int(y.min())}..{int(y.max())}"
            )
        total += F.cross_entropy(logits.float(), y.long(), reduction="sum").item()
    return total / len(images)


def _check_data(images, labels, batch_size) -> None:
    """Refuse data that cannot be scored, in one line, before anything runs."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise UserError("images must be a float tensor [N, C, H, W]")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.ndim != 1
        or labels.is_floating_point()
        or labels.dtype == torch.bool
    ):
        raise UserError("labels must be an integer tensor [N] of class indices")
    if len(images) == 0 or len(images) != len(labels):
        raise UserError(
            f"need as many labels as images (>= 1), got {len(images)} and {len(labels)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
