"""Architecture records and the models they describe: build, load and reshape.

A checkpoint never pickles modules: it stores a plain-data architecture record (`make_arch`), and
`build_model(checkpoint["arch"])` rebuilds the network (resnet_slim/train/architectures.py) that
`load_state_dict` fills. A pruned network is the same architecture plus per-layer channel counts
(`arch["channels"]`), a factorized one plus per-layer ranks (`arch["lowrank"]`), a depth-pruned
ResNet plus its residual blocks per stage (`arch["blocks"]`, resnet_slim/compress/depth.py; absent
or None: the architecture's own). Every record is bounded before anything is built
(resnet_slim/train/model_bounds.py).
"""

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from resnet_slim.errors import UserError
from resnet_slim.train.architectures import (
    ARCHS,
    CIFAR_DEPTHS,
    STUDENT_ONLY,
    CifarResNet,
    MobileNetV3Small,
    ResNet,
    freeze_shortcuts,
)
from resnet_slim.train.model_bounds import check_arch_size


@runtime_checkable
class Student(Protocol):
    """What distillation and every stage after it need from a model (teacher or student): class
    logits from `forward`, each stage's output from `forward_features` (the feature-KD term, and
    the stage widths its projectors are sized from), and the name of the classifier layer (never
    pruned; replaced with `replace_head`). Every network in architectures.py provides it."""

    classifier_name: str

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]: ...


def make_arch(
    *,
    name: str,
    num_classes: int,
    width: int = 64,
    small_input: bool = True,
    depth: int | None = None,
) -> dict:
    """The plain-data architecture record stored in every checkpoint.

    `cifar_resnet` also records its `depth` (20/32/44/56/110); its stem is always the small one.
    """
    if name == "cifar_resnet":
        if depth not in CIFAR_DEPTHS:
            raise UserError(f"cifar_resnet depth must be one of {list(CIFAR_DEPTHS)}, got {depth}")
        return {
            "name": name,
            "depth": int(depth),
            "num_classes": int(num_classes),
            "width": int(width),
            "small_input": True,
            "channels": None,
        }
    if name not in ARCHS and name not in STUDENT_ONLY:
        raise UserError(
            f"unknown architecture {name!r}; choose one of "
            f"{sorted(ARCHS) + list(STUDENT_ONLY) + ['cifar_resnet']}"
        )
    return {
        "name": name,
        "num_classes": int(num_classes),
        "width": int(width),
        "small_input": bool(small_input),
        "channels": None,
    }


def build_model(arch: dict, *, image_size: int | None = None) -> nn.Module:
    """Rebuild a model from its architecture record (pruned blocks and channel counts included).

    The record is checked first (`check_arch_size`, at `image_size` when the caller knows the
    data's), so a corrupt or hostile one is one line, never a huge allocation."""
    check_arch_size(arch, image_size=image_size)
    try:
        if arch["name"] == "mobilenet_v3_small":
            model = MobileNetV3Small(
                num_classes=arch["num_classes"],
                width=arch["width"],
                small_input=arch["small_input"],
            )
        elif arch["name"] == "cifar_resnet":
            model = CifarResNet(
                depth=arch["depth"],
                num_classes=arch["num_classes"],
                width=arch["width"],
                blocks=arch.get("blocks"),
            )
        else:
            block, layers = ARCHS[arch["name"]]
            model = ResNet(
                block,
                layers,
                num_classes=arch["num_classes"],
                width=arch["width"],
                small_input=arch["small_input"],
                blocks=arch.get("blocks"),
            )
        if arch.get("channels"):
            resize_to_channels(model, arch["channels"])
        if arch.get(
            "lowrank"
        ):  # {layer: rank} of an SVD-factorized model (resnet_slim/compress/lowrank.py)
            factorized_structure(model, arch["lowrank"])
        freeze_shortcuts(model)  # layers re-created above come back trainable
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise UserError(
            f"bad architecture record {str(arch)[:200]}: {err.__class__.__name__}: {err}"
        ) from None
    return model


def load_model(
    path, *, num_classes: int | None = None, image_size: int | None = None
) -> tuple[nn.Module, dict]:
    """(model rebuilt from a checkpoint's architecture record with its weights, the checkpoint).

    With `num_classes` (the prepared dataset's), a model trained for another dataset is refused;
    with `image_size` (the prepared dataset's), the record's activations are bounded at that size.
    """
    from resnet_slim.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(path)
    try:
        model = build_model(checkpoint["arch"], image_size=image_size)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    if num_classes is not None and checkpoint["arch"]["num_classes"] != num_classes:
        raise UserError(
            f"{path}: model has {checkpoint['arch']['num_classes']} classes but the "
            f"prepared dataset has {num_classes}; re-train it on this dataset"
        )
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise UserError(
            f"{path}: weights do not match the checkpoint's architecture record ({detail})"
        ) from None
    return model, checkpoint


def channel_record(model: nn.Module) -> dict[str, list[int]]:
    """[out, in] channels of every conv, [features] of every BN and [out, in] of the classifier."""
    record = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            record[name] = [module.out_channels, module.in_channels]
        elif isinstance(module, nn.BatchNorm2d):
            record[name] = [module.num_features]
        elif isinstance(module, nn.Linear):
            record[name] = [module.out_features, module.in_features]
    return record


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the dotted `name` ("layer1.0.conv1", or a top-level "fc") is in `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def resize_to_channels(model: nn.Module, channels: dict[str, list[int]]) -> None:
    """Re-create conv/BN/linear layers with recorded channel counts (weights are loaded after)."""
    for name, module in list(model.named_modules()):
        if name not in channels:
            continue
        if isinstance(module, nn.Conv2d):
            out_c, in_c = channels[name]
            new = nn.Conv2d(
                in_c,
                out_c,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.bias is not None,
            )
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(channels[name][0], eps=module.eps, momentum=module.momentum)
        elif isinstance(module, nn.Linear):
            out_f, in_f = channels[name]
            new = nn.Linear(in_f, out_f, bias=module.bias is not None)
        else:
            raise UserError(
                f"architecture record names {name!r}, which is a "
                f"{module.__class__.__name__}, not a conv/BN/linear layer"
            )
        replace_submodule(model, name, new)


def low_rank_pair(module: nn.Module, rank: int) -> nn.Sequential:
    """The two-layer replacement of `module`, weights uninitialised (filled by the caller)."""
    if isinstance(module, nn.Linear):
        return nn.Sequential(
            nn.Linear(module.in_features, rank, bias=False),
            nn.Linear(rank, module.out_features, bias=module.bias is not None),
        )
    return nn.Sequential(
        nn.Conv2d(
            module.in_channels,
            rank,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            bias=False,
        ),
        nn.Conv2d(rank, module.out_channels, 1, bias=module.bias is not None),
    )


def factorized_structure(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Swap each named layer for its rank-r pair (fresh weights): rebuilding from a checkpoint."""
    for name, rank in ranks.items():
        module = model.get_submodule(name)  # AttributeError, like a bad rank, is a bad record
        if (
            not isinstance(module, (nn.Conv2d, nn.Linear))
            or getattr(module, "groups", 1) != 1
            or not isinstance(rank, int)
            or isinstance(rank, bool)
            or rank < 1
        ):
            raise ValueError(
                f"{name}: cannot factorize {module.__class__.__name__} to rank {rank!r}"
            )
        replace_submodule(model, name, low_rank_pair(module, rank))
    return model
