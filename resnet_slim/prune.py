"""Channel pruning (network slimming, L1 filters) and unstructured magnitude pruning.

Network slimming (Liu et al. 2017, arXiv:1708.06519): train with an L1 penalty on every BN scale
γ so that unimportant channels drift to γ ≈ 0, rank channels by |γ| (globally across layers),
physically remove the lowest, then fine-tune. Removal is done by torch-pruning's dependency graph,
so channels tied together (a block's output, its residual add, the downsample branch and the next
block's input) are removed together and the result is a plain, smaller `nn.Module`. A CIFAR
ResNet's option-A shortcut is a fixed 0/1 1x1 conv (models.option_a_weight), so removal slices it
like any conv and the shortcut stays exact for the channels that remain.
"""

import copy
from pathlib import Path
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune

from resnet_slim import engine
from resnet_slim.distill import kd_logit_loss
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path
from resnet_slim.models import freeze_shortcuts

CHANNEL_METHODS = ("bn_slimming", "l1_filter")
# the models' classifiers (models.ResNet: fc, models.CifarResNet: linear): classes are never pruned
CLASSIFIERS = ("fc", "linear")


def bn_l1_hook(l1_lambda: float) -> Callable[[nn.Module], None]:
    """An `engine.fit(after_backward=...)` hook adding the subgradient of λ·Σ|γ| to BN grads.

    This is the sparsity-training term of network slimming (arXiv:1708.06519, eq. 1): every
    BatchNorm2d weight gradient gets `λ·sign(γ)` (0 where γ is exactly 0).
    """
    if not l1_lambda >= 0:
        raise UserError(f"prune.sparsity.l1_lambda must be >= 0, got {l1_lambda}")

    @torch.no_grad()
    def hook(model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and module.weight is not None \
                    and module.weight.grad is not None:
                module.weight.grad.add_(l1_lambda * torch.sign(module.weight))
    return hook


def _importance(method: str):
    if method == "bn_slimming":
        # The paper's criterion: raw |γ| (no per-layer normalisation), so a global threshold is
        # meaningful. Channels coupled by residual adds get the mean |γ| of their BNs.
        return tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)
    # L1 norm of the conv weights touching each channel (Li et al. 2017, arXiv:1608.08710),
    # divided by the layer's mean so that layers with large fan-in do not dominate a global rank.
    return tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer="mean",
                                             target_types=[nn.Conv2d])


def prune_channels(model: nn.Module, *, method: str, ratio: float, round_to: int | None,
                   global_pruning: bool, image_size: int) -> nn.Module:
    """A copy of `model` with `ratio` of its prunable conv channels physically removed.

    method: "bn_slimming" (rank by BN |γ|) or "l1_filter" (rank by conv-weight L1 norm).
    global_pruning: one threshold across all layers (true) or `ratio` of every layer (false).
    round_to: kept channel counts are rounded to the nearest multiple of this. Every layer keeps
    at least round_to (or 1) channels, and one with fewer than round_to is left whole, so the
    channels actually removed can differ a little from `ratio` (`channels_kept` reports it). The classifier's outputs are never
    pruned. `model` itself is not modified.
    """
    if method not in CHANNEL_METHODS:
        raise UserError(f"prune.method {method!r} does not remove channels; "
                        f"choose one of {list(CHANNEL_METHODS)}")
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"prune.ratio must be in [0, 1) (the fraction of channels removed), "
                        f"got {ratio}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise UserError(f"prune.round_to must be a positive integer or null, got {round_to!r}")
    if image_size < 1:
        raise UserError(f"image_size must be positive, got {image_size}")
    pruned = copy.deepcopy(model).eval()  # eval: tracing must not update BN running stats
    example = torch.zeros(1, 3, image_size, image_size)
    importance = _importance(method)
    ignored = [pruned.get_submodule(pruned.classifier_name)]
    plan = _removal_plan(pruned, example, importance, ignored, ratio=ratio,
                         global_pruning=global_pruning, min_keep=round_to or 1)
    if plan:
        # Per-layer counts as ratios; torch-pruning picks the lowest-importance channels of each
        # group, removes them from every coupled layer and rounds kept counts down to round_to.
        pruner = tp.pruner.BasePruner(pruned, example, importance=importance, pruning_ratio=0.0,
                                      pruning_ratio_dict=plan, global_pruning=False,
                                      round_to=round_to, ignored_layers=ignored)
        pruner.step()
        freeze_shortcuts(pruned)  # torch-pruning re-creates the sliced weights as trainable
    pruned.train(model.training)
    return pruned


def _removal_plan(model: nn.Module, example: torch.Tensor, importance, ignored: list[nn.Module], *,
                  ratio: float, global_pruning: bool, min_keep: int) -> dict[nn.Module, float]:
    """{root module of a coupled channel group: fraction of its channels to remove}.

    Computed here rather than by torch-pruning's global mode because that one skips a group
    entirely when the global threshold would remove all its channels, so the *least* important
    layer would be kept whole; here each group keeps at least `min_keep` channels instead.
    """
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    scores = []
    for group in graph.get_all_groups(ignored_layers=ignored,
                                      root_module_types=[nn.Conv2d, nn.Linear]):
        score = importance(group)
        if score is not None:
            scores.append((group[0].dep.target.module, score))
    if global_pruning:
        # Network slimming's global threshold: the n_remove lowest scores over all layers. Ties
        # (an untrained net's equal γ) go by each channel's rank within its own layer, so they are
        # spread over layers in proportion instead of emptying whichever layer comes first.
        every = torch.cat([score for _, score in scores])
        n_remove = len(every) - int(len(every) * (1.0 - ratio))
        owner = torch.cat([torch.full((len(score),), i) for i, (_, score) in enumerate(scores)])
        rank_in_layer = torch.cat([(torch.argsort(torch.argsort(score, stable=True)) + 0.5)
                                   / len(score) for _, score in scores])
        by_rank = torch.argsort(rank_in_layer, stable=True)
        lowest = by_rank[torch.argsort(every[by_rank], stable=True)][:n_remove]
        counts = torch.bincount(owner[lowest], minlength=len(scores)).tolist()
        wanted = {module: n for (module, _), n in zip(scores, counts)}
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


def prune_unstructured(model: nn.Module, *, ratio: float) -> nn.Module:
    """A copy of `model` with the `ratio` smallest-|w| conv/linear weights (global rank) set to 0.

    This only reduces the number of non-zero weights: tensor shapes, the dense checkpoint/ONNX file
    size and CPU latency stay the same (dense kernels multiply the zeros too). It is a baseline
    for comparison with channel pruning, not a speed-up. `model` itself is not modified.
    """
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"prune.ratio must be in [0, 1) (the fraction of weights zeroed), "
                        f"got {ratio}")
    pruned = copy.deepcopy(model)
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured,
                                    amount=ratio)
    for module, name in targets:
        torch_prune.remove(module, name)  # bake the mask in: plain `weight` tensors again
    return pruned


def keep_zeros_hook(model: nn.Module) -> Callable[[nn.Module], None]:
    """An `after_backward` hook that zeroes the grads of conv/linear weights that are 0 now.

    With the shared loop's SGD (weight decay of a zero weight is zero) those weights then stay
    exactly 0, so fine-tuning after `prune_unstructured` keeps the sparsity it was given.
    """
    masks = {name: (module.weight != 0) for name, module in model.named_modules()
             if isinstance(module, (nn.Conv2d, nn.Linear))}

    @torch.no_grad()
    def hook(trained: nn.Module) -> None:
        for name, mask in masks.items():
            weight = trained.get_submodule(name).weight
            if weight.grad is not None:
                weight.grad.mul_(mask)
    return hook


def finetune_loss(teacher: nn.Module | None, *, kd_alpha: float, temperature: float,
                  label_smoothing: float = 0.0) -> engine.LossFn:
    """Cross-entropy, or with kd_alpha > 0 KD: α·T²·KL(p_t^T ‖ p_s^T) + (1−α)·CE."""
    if kd_alpha == 0.0 or teacher is None:
        return engine.cross_entropy(label_smoothing)

    def loss_fn(model: nn.Module, images: torch.Tensor, targets):
        labels = targets[0] if isinstance(targets, tuple) else targets
        teacher.eval()  # fixed soft targets: running BN statistics, no dropout, no grads
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = model(images)
        return kd_logit_loss(logits, teacher_logits, labels, alpha=kd_alpha,
                             temperature=temperature), logits
    return loss_fn


def count_macs_params(model: nn.Module, image_size: int) -> tuple[int, int]:
    """(multiply-accumulates of one image_size² image, parameter count), by torch-pruning."""
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, image_size, image_size))
    return int(macs), int(params)


def count_nonzero(model: nn.Module) -> int:
    """Non-zero entries over all parameters (what unstructured pruning reduces)."""
    return int(sum(torch.count_nonzero(p).item() for p in model.parameters()))


def kept_channels(before: dict, after: dict) -> list[dict]:
    """Rows {layer, before, after} of conv output channels, from two `models.channel_record`s."""
    rows = []
    for layer, shape in before.items():
        if len(shape) == 2 and layer not in CLASSIFIERS:  # [out, in]: a conv (BNs are [n])
            rows.append({"layer": layer, "before": int(shape[0]), "after": int(after[layer][0])})
    return rows


def plot_kept_channels(rows: list[dict], path: str | Path) -> None:
    """A bar chart of each conv's output channels before/after pruning, as a PNG (atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend / figure state

    figure = Figure(figsize=(7, 0.22 * len(rows) + 1.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(rows))
    axes.barh(positions, [r["before"] for r in rows], color="#d0d7e1", label="before")
    axes.barh(positions, [r["after"] for r in rows], color="#2b6cb0", label="kept")
    axes.set_yticks(list(positions), [r["layer"] for r in rows], fontsize=6)
    axes.set_ylim(len(rows) - 0.5, -0.5)  # first layer on top, no empty margins
    axes.set_xlabel("output channels")
    total_before = sum(r["before"] for r in rows)
    total_after = sum(r["after"] for r in rows)
    axes.set_title(f"Conv channels kept: {total_after}/{total_before} "
                   f"({100.0 * total_after / max(total_before, 1):.1f}%)", fontsize=9)
    axes.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
