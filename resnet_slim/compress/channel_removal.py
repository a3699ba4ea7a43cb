"""Physical channel removal: rank conv channels, plan how many each layer loses, cut them out.

Removal is done by torch-pruning's dependency graph, so channels tied together (a block's output,
its residual add, the downsample branch and the next block's input) are removed together and the
result is a plain, smaller `nn.Module`. A CIFAR ResNet's option-A shortcut is a fixed 0/1 1x1 conv
(architectures.option_a_weight), so removal slices it like any conv and the shortcut stays exact for
the channels that remain. Channels are ranked by BN |γ| (network slimming, arXiv:1708.06519) or by
conv-weight L1 norm (arXiv:1608.08710); resnet_slim/compress/prune.py trains and fine-tunes around
the cut.
"""

import copy

import torch
import torch_pruning as tp
from torch import nn

from resnet_slim import registry
from resnet_slim.errors import UserError
from resnet_slim.train.architectures import freeze_shortcuts

CHANNEL_METHODS = registry.CHANNEL_PRUNE_METHODS


def _importance(method: str):
    if method == "bn_slimming":
        # The paper's criterion: raw |γ| (no per-layer normalisation), so a global threshold is
        # meaningful. Channels coupled by residual adds get the mean |γ| of their BNs.
        return tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)
    # L1 norm of the conv weights touching each channel (Li et al. 2017, arXiv:1608.08710),
    # divided by the layer's mean so that layers with large fan-in do not dominate a global rank.
    return tp.importance.MagnitudeImportance(
        p=1, group_reduction="mean", normalizer="mean", target_types=[nn.Conv2d]
    )


def prune_channels(
    model: nn.Module,
    *,
    method: str,
    ratio: float,
    round_to: int | None,
    global_pruning: bool,
    image_size: int,
    keep_residual_streams: bool = False,
) -> nn.Module:
    """A copy of `model` with `ratio` of its prunable conv channels physically removed.

    method: "bn_slimming" (rank by BN |γ|) or "l1_filter" (rank by conv-weight L1 norm).
    global_pruning: one threshold across all layers (true) or `ratio` of every layer (false).
    round_to: kept channel counts are rounded to the nearest multiple of this. Every layer keeps
    at least round_to (or 1) channels, and one with fewer than round_to is left whole, so the
    channels actually removed can differ a little from `ratio` (`channels_kept` reports it). The
    classifier's outputs are never pruned. `model` itself is not modified.
    keep_residual_streams: leave whole every channel group that more than one conv writes to (a
    ResNet stage's residual stream: the stem or block input, each block's conv2, the shortcut,
    all summed by the additions); only channels inside blocks are ranked and removed.
    """
    _check_channel_args(method=method, ratio=ratio, round_to=round_to, image_size=image_size)
    pruned = copy.deepcopy(model).eval()  # eval: tracing must not update BN running stats
    example = torch.zeros(1, 3, image_size, image_size)
    importance = _importance(method)
    ignored = [pruned.get_submodule(pruned.classifier_name)]
    plan = _removal_plan(
        pruned,
        example,
        importance,
        ignored,
        ratio=ratio,
        global_pruning=global_pruning,
        min_keep=round_to or 1,
        keep_residual_streams=keep_residual_streams,
    )
    if plan:
        _remove_planned(pruned, example, importance, ignored, plan=plan, round_to=round_to)
    pruned.train(model.training)
    return pruned


def narrow_blocks(model: nn.Module, widths: dict[str, int], *, image_size: int) -> nn.Module:
    """A copy of `model` whose named residual blocks keep `widths[name]` inner channels (conv1's
    outputs = conv2's inputs), the ones with the largest bn1 |γ| (network slimming's rank; a
    latency-aware plan chose the widths, compress/latency_prune.py). `model` is not modified."""
    narrowed = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(
        narrowed, example_inputs=torch.zeros(1, 3, image_size, image_size)
    )
    for name, width in widths.items():
        block = narrowed.get_submodule(name)
        have = block.conv1.out_channels
        if not 1 <= width <= have:
            raise UserError(f"{name}: cannot keep {width} of its {have} inner channels")
        lowest = torch.argsort(block.bn1.weight.detach().abs(), stable=True)[: have - width]
        if len(lowest):
            graph.get_pruning_group(
                block.conv1, tp.prune_conv_out_channels, idxs=lowest.tolist()
            ).prune()
    freeze_shortcuts(narrowed)  # torch-pruning re-creates the sliced weights as trainable
    narrowed.train(model.training)
    return narrowed


def _check_channel_args(*, method: str, ratio: float, round_to: int | None, image_size: int):
    """Refuse settings that cannot describe a channel removal, before any copy or trace."""
    if method not in CHANNEL_METHODS:
        raise UserError(
            f"prune.method {method!r} does not remove channels; "
            f"choose one of {list(CHANNEL_METHODS)}"
        )
    if not 0.0 <= ratio < 1.0:
        raise UserError(
            f"prune.ratio must be in [0, 1) (the fraction of channels removed), got {ratio}"
        )
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise UserError(f"prune.round_to must be a positive integer or null, got {round_to!r}")
    if image_size < 1:
        raise UserError(f"image_size must be positive, got {image_size}")


def _remove_planned(
    model: nn.Module,
    example: torch.Tensor,
    importance,
    ignored: list[nn.Module],
    *,
    plan: dict[nn.Module, float],
    round_to: int | None,
) -> None:
    """Cut the planned channels out of `model`, in place.

    Per-layer counts as ratios; torch-pruning picks the lowest-importance channels of each group,
    removes them from every coupled layer and rounds kept counts down to round_to.
    """
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict=plan,
        global_pruning=False,
        round_to=round_to,
        ignored_layers=ignored,
    )
    pruner.step()
    freeze_shortcuts(model)  # torch-pruning re-creates the sliced weights as trainable


def _removal_plan(
    model: nn.Module,
    example: torch.Tensor,
    importance,
    ignored: list[nn.Module],
    *,
    ratio: float,
    global_pruning: bool,
    min_keep: int,
    keep_residual_streams: bool,
) -> dict[nn.Module, float]:
    """{root module of a coupled channel group: fraction of its channels to remove}.

    Computed here rather than by torch-pruning's global mode because that one skips a group
    entirely when the global threshold would remove all its channels, so the *least* important
    layer would be kept whole; here each group keeps at least `min_keep` channels instead.
    """
    scores = _group_scores(model, example, importance, ignored, keep_residual_streams)
    if global_pruning:
        wanted = _global_counts(scores, ratio)
    else:
        wanted = {module: len(score) - int(len(score) * (1.0 - ratio)) for module, score in scores}
    plan = {}
    for module, score in scores:
        # Kept counts go to the *nearest* multiple of round_to (torch-pruning alone rounds down,
        # which turned ratio 0.3 into 45% of channels removed on the default ResNet-18).
        keep = len(score) - wanted[module]
        keep = max(min_keep, int(keep / min_keep + 0.5) * min_keep)
        n_remove = max(len(score) - keep, 0)
        if n_remove > 0:
            # torch-pruning removes n - int(n * (1 - r)) channels; the -0.5 makes that exactly
            # n_remove despite float rounding.
            plan[module] = (n_remove - 0.5) / len(score)
    return plan


def _group_scores(
    model: nn.Module,
    example: torch.Tensor,
    importance,
    ignored: list[nn.Module],
    keep_residual_streams: bool,
) -> list[tuple[nn.Module, torch.Tensor]]:
    """(root module, per-channel importance) of every prunable coupled channel group, in graph
    order; residual streams are left out when they are to stay whole."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    scores = []
    for group in graph.get_all_groups(
        ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]
    ):
        if keep_residual_streams and _conv_writers(group) > 1:
            continue
        score = importance(group)
        if score is not None:
            scores.append((group[0].dep.target.module, score))
    return scores


def _global_counts(
    scores: list[tuple[nn.Module, torch.Tensor]], ratio: float
) -> dict[nn.Module, int]:
    """{module: channels to remove} under network slimming's global threshold: the n_remove lowest
    scores over all layers. Ties (an untrained net's equal γ) go by each channel's rank within its
    own layer, so they are spread over layers in proportion instead of emptying whichever layer
    comes first."""
    every = torch.cat([score for _, score in scores])
    n_remove = len(every) - int(len(every) * (1.0 - ratio))
    owner = torch.cat([torch.full((len(score),), i) for i, (_, score) in enumerate(scores)])
    rank_in_layer = torch.cat(
        [
            (torch.argsort(torch.argsort(score, stable=True)) + 0.5) / len(score)
            for _, score in scores
        ]
    )
    by_rank = torch.argsort(rank_in_layer, stable=True)
    lowest = by_rank[torch.argsort(every[by_rank], stable=True)][:n_remove]
    counts = torch.bincount(owner[lowest], minlength=len(scores)).tolist()
    return {module: n for (module, _), n in zip(scores, counts, strict=True)}


def _conv_writers(group) -> int:
    """How many convs produce the group's channels (1 inside a block; more on a residual stream)."""
    return sum(
        isinstance(dep.target.module, nn.Conv2d) and dep.handler.__name__ == "prune_out_channels"
        for dep, _ in group
    )
