"""Channel pruning (network slimming, L1 filters) and unstructured magnitude pruning.

Network slimming (Liu et al. 2017, arXiv:1708.06519): train with an L1 penalty on every BN scale
γ so that unimportant channels drift to γ ≈ 0, rank channels by |γ| (globally across layers),
physically remove the lowest, then fine-tune. Removal is done by torch-pruning's dependency graph,
so channels tied together (a block's output, its residual add, the downsample branch and the next
block's input) are removed together and the result is a plain, smaller `nn.Module`. A CIFAR
ResNet's option-A shortcut is a fixed 0/1 1x1 conv (models.option_a_weight), so removal slices it
like any conv and the shortcut stays exact for the channels that remain.

The slim_prune stage's work is `slim_prune_and_finetune`; the lowrank stage's, its like-for-like
alternative at the same parameter budget, is `factorize_and_finetune` (why here: its docstring).
"""

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune

from resnet_slim.compress import lowrank
from resnet_slim.data import loader as data
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path
from resnet_slim.train import distributed, engine
from resnet_slim.train.models import build_model, channel_record, freeze_shortcuts, load_model

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
            # _BatchNorm: BatchNorm2d, and SyncBatchNorm under DDP with base.sync_bn (not a
            # BatchNorm2d subclass). The gradients are already averaged over ranks and γ is the
            # same on every rank, so every rank adds the same term.
            if (
                isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.weight is not None
                and module.weight.grad is not None
            ):
                module.weight.grad.add_(l1_lambda * torch.sign(module.weight))

    return hook


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
        # Per-layer counts as ratios; torch-pruning picks the lowest-importance channels of each
        # group, removes them from every coupled layer and rounds kept counts down to round_to.
        pruner = tp.pruner.BasePruner(
            pruned,
            example,
            importance=importance,
            pruning_ratio=0.0,
            pruning_ratio_dict=plan,
            global_pruning=False,
            round_to=round_to,
            ignored_layers=ignored,
        )
        pruner.step()
        freeze_shortcuts(pruned)  # torch-pruning re-creates the sliced weights as trainable
    pruned.train(model.training)
    return pruned


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
    if global_pruning:
        # Network slimming's global threshold: the n_remove lowest scores over all layers. Ties
        # (an untrained net's equal γ) go by each channel's rank within its own layer, so they are
        # spread over layers in proportion instead of emptying whichever layer comes first.
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
        wanted = {module: n for (module, _), n in zip(scores, counts, strict=True)}
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


def _conv_writers(group) -> int:
    """How many convs produce the group's channels (1 inside a block; more on a residual stream)."""
    return sum(
        isinstance(dep.target.module, nn.Conv2d) and dep.handler.__name__ == "prune_out_channels"
        for dep, _ in group
    )


def prune_unstructured(model: nn.Module, *, ratio: float) -> nn.Module:
    """A copy of `model` with the `ratio` smallest-|w| conv/linear weights (global rank) set to 0.

    This only reduces the number of non-zero weights: tensor shapes, the dense checkpoint/ONNX file
    size and CPU latency stay the same (dense kernels multiply the zeros too). It is a baseline
    for comparison with channel pruning, not a speed-up. `model` itself is not modified.
    """
    if not 0.0 <= ratio < 1.0:
        raise UserError(
            f"prune.ratio must be in [0, 1) (the fraction of weights zeroed), got {ratio}"
        )
    pruned = copy.deepcopy(model)
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch_prune.global_unstructured(
        targets, pruning_method=torch_prune.L1Unstructured, amount=ratio
    )
    for module, name in targets:
        torch_prune.remove(module, name)  # bake the mask in: plain `weight` tensors again
    return pruned


def keep_zeros_hook(model: nn.Module) -> Callable[[nn.Module], None]:
    """An `after_backward` hook that zeroes the grads of conv/linear weights that are 0 now.

    With the shared loop's SGD (weight decay of a zero weight is zero) those weights then stay
    exactly 0, so fine-tuning after `prune_unstructured` keeps the sparsity it was given.
    """
    masks = {
        name: (module.weight != 0)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }

    @torch.no_grad()
    def hook(trained: nn.Module) -> None:
        trained = distributed.unwrap(trained)  # DDP would prefix every name with "module."
        for name, mask in masks.items():
            weight = trained.get_submodule(name).weight
            if weight.grad is not None:
                # the masks follow the model to its device once (a no-op on the CPU)
                masks[name] = mask = mask.to(weight.device)
                weight.grad.mul_(mask)

    return hook


def finetune_loss(
    teacher: nn.Module | None, *, kd_alpha: float, temperature: float, label_smoothing: float = 0.0
) -> engine.LossFn:
    """Cross-entropy, or with kd_alpha > 0 KD: α·T²·KL(p_t^T ‖ p_s^T) + (1−α)·CE."""
    if kd_alpha == 0.0 or teacher is None:
        return engine.cross_entropy(label_smoothing)

    def loss_fn(model: nn.Module, images: torch.Tensor, targets):
        labels = targets[0] if isinstance(targets, tuple) else targets
        teacher.eval()  # fixed soft targets: running BN statistics, no dropout, no grads
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = model(images)
        return engine.kd_logit_loss(
            logits, teacher_logits, labels, alpha=kd_alpha, temperature=temperature
        ), logits

    return loss_fn


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
    axes.set_title(
        f"Conv channels kept: {total_after}/{total_before} "
        f"({100.0 * total_after / max(total_before, 1):.1f}%)",
        fontsize=9,
    )
    axes.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


# ---------------------------------------------------------------- the stages' work


def slim_prune_and_finetune(
    *,
    teacher_path: str | Path,
    prepared_dir: str | Path,
    reports: str | Path,
    params,
    device: torch.device,
) -> tuple[nn.Module, dict, dict, list[dict]] | None:
    """The slim_prune stage's work: sparsity training (bn_slimming), channel removal (or magnitude
    zeroing), fine-tuning (KD with prune.kd_alpha > 0) on `device`, DVCLive logs under `reports`.

    Returns (pruned plain CPU model, its architecture record, metrics, kept-channel rows) on rank
    0 and None on the other ranks, which write nothing (and so skip the MAC counts).
    """
    p, base = params.prune, params.base
    engine.seed_everything(base.seed, distributed.threads_per_process(base.threads))
    teacher, checkpoint = load_model(
        teacher_path, num_classes=len(data.load_meta(prepared_dir)["class_names"])
    )
    model = build_model(checkpoint["arch"])
    model.load_state_dict(checkpoint["state_dict"])
    _, val_loader, test_loader, meta = engine.rank_loaders(
        prepared_dir, batch_size=p.finetune.batch_size, base=base
    )
    teacher, size = teacher.to(device), meta["image_size"]  # teacher: forward only, no DDP
    top1 = {"before": engine.evaluate(teacher, test_loader)["top1"]}
    val_top1 = {"before": engine.evaluate(teacher, val_loader)["top1"]}

    def train(model, phase, desc, loss_fn, after_backward):  # on `device`; a plain CPU model back
        train_loader, *_ = engine.rank_loaders(prepared_dir, batch_size=phase.batch_size, base=base)
        return engine.fit_on(
            device,
            model,
            train_loader,
            val_loader,
            phase,
            sync_bn=base.sync_bn,
            loss_fn=loss_fn,
            live_dir=f"{reports}/{desc}",
            desc=desc,
            after_backward=after_backward,
        )

    if p.method == "bn_slimming" and p.sparsity.epochs > 0:
        model, _ = train(
            model,
            p.sparsity,
            "sparsity",
            engine.cross_entropy(p.sparsity.label_smoothing),
            bn_l1_hook(p.sparsity.l1_lambda),
        )
        top1["after_sparsity"] = engine.evaluate(model, test_loader)["top1"]
    # Every process removes the same weights: DDP kept them equal on all ranks (averaged gradients,
    # BN statistics synced each epoch) and removal is a deterministic function of them; the DDP
    # wrap for fine-tuning also checks shapes across ranks and broadcasts rank 0's values.
    if p.method == "magnitude":
        pruned = prune_unstructured(model, ratio=p.ratio)
        keep_zeros = keep_zeros_hook(pruned)
    else:
        pruned = prune_channels(
            model,
            method=p.method,
            ratio=p.ratio,
            round_to=p.round_to,
            global_pruning=p.global_pruning,
            image_size=size,
            keep_residual_streams=p.keep_residual_streams,
        )
        keep_zeros = None
    top1["after_removal"] = engine.evaluate(pruned, test_loader)["top1"]
    pruned, history = train(
        pruned,
        p.finetune,
        "finetune",
        finetune_loss(
            teacher,
            kd_alpha=p.kd_alpha,
            temperature=p.temperature,
            label_smoothing=p.finetune.label_smoothing,
        ),
        keep_zeros,
    )
    top1["after_finetune"] = engine.evaluate(pruned, test_loader)["top1"]
    if not distributed.is_main_process():
        return None
    teacher = teacher.cpu()
    from resnet_slim.compress.export import (
        count_macs_params,
    )  # onnx: the training stages need it only here

    (t_macs, t_params), (s_macs, s_params) = (count_macs_params(m, size) for m in (teacher, pruned))
    rows = kept_channels(channel_record(teacher), channel_record(pruned))
    val_top1["after_finetune"] = history[-1]["val_top1"]
    metrics = {
        "method": p.method,
        "ratio": p.ratio,
        "top1_test": top1,
        "top1_val": val_top1,
        "macs": {"teacher": t_macs, "pruned": s_macs, "ratio": s_macs / t_macs},
        "params": {"teacher": t_params, "pruned": s_params, "ratio": s_params / t_params},
        "nonzero_params": {"teacher": count_nonzero(teacher), "pruned": count_nonzero(pruned)},
        "channels_kept": sum(r["after"] for r in rows) / sum(r["before"] for r in rows),
    }
    return pruned, {**checkpoint["arch"], "channels": channel_record(pruned)}, metrics, rows


def factorize_and_finetune(
    *,
    teacher_path: str | Path,
    pruned_path: str | Path,
    prepared_dir: str | Path,
    reports: str | Path,
    params,
    device: torch.device,
) -> tuple[nn.Module, dict, dict] | None:
    """The lowrank stage's work: SVD-factorize the teacher (resnet_slim/compress/lowrank.py) to
    lowrank.params_ratio of its parameters (match_pruned: the pruned model's share), then
    fine-tune on `device`, DVCLive logs under `reports`.

    Returns (plain CPU model, its architecture record, metrics) on rank 0 and None on the other
    ranks, which write nothing. It lives here, not in lowrank.py, because models.py imports
    lowrank.py to rebuild factorized checkpoints: training code there would make every stage that
    loads a model (train_teacher, export, ...) depend on it in dvc.yaml.
    """
    p, base = params.lowrank, params.base
    engine.seed_everything(base.seed, distributed.threads_per_process(base.threads))
    train_loader, val_loader, test_loader, meta = engine.rank_loaders(
        prepared_dir, batch_size=p.finetune.batch_size, base=base
    )
    num_classes, size = len(meta["class_names"]), meta["image_size"]
    teacher, checkpoint = load_model(teacher_path, num_classes=num_classes)
    model, _ = load_model(teacher_path, num_classes=num_classes)  # factorized in place
    pruned = None
    target = p.params_ratio
    if target == "match_pruned":  # non-zero counts: also right for unstructured (magnitude) pruning
        pruned, _ = load_model(pruned_path, num_classes=num_classes)
        target = count_nonzero(pruned) / count_nonzero(teacher)
    # Every process gets the same ranks and factors: each loaded the same teacher file, and the
    # SVD of the same matrices on the same CPU is deterministic (fit_on's DDP wrap then checks
    # the shapes across ranks and broadcasts rank 0's values).
    ranks = lowrank.choose_ranks(model, params_ratio=target, round_to=p.round_to)
    lowrank.factorize_svd(model, ranks)

    top1 = {
        "before": engine.evaluate(teacher, test_loader)["top1"],
        "after_factorization": engine.evaluate(model, test_loader)["top1"],
    }
    model, history = engine.fit_on(
        device,
        model,
        train_loader,
        val_loader,
        p.finetune,
        sync_bn=base.sync_bn,
        desc="lowrank finetune",
        loss_fn=engine.cross_entropy(p.finetune.label_smoothing),
        live_dir=f"{reports}/finetune",
    )
    top1["after_finetune"] = engine.evaluate(model, test_loader)["top1"]
    if not distributed.is_main_process():
        return None
    from resnet_slim.compress.export import (
        count_macs_params,
    )  # onnx: the training stages need it only here

    counts = {
        "teacher": count_macs_params(teacher, size),
        "lowrank": count_macs_params(model, size),
    }
    if pruned is not None:
        counts["pruned"] = count_macs_params(pruned, size)
    metrics = {
        "params_ratio_target": target,
        "round_to": p.round_to,
        "ranks": ranks,
        "top1_test": top1,
        "val_top1": history[-1]["val_top1"],
        "params": {k: v[1] for k, v in counts.items()},
        "macs": {k: v[0] for k, v in counts.items()},
    }
    for key in ("params", "macs"):
        metrics[key]["ratio"] = metrics[key]["lowrank"] / metrics[key]["teacher"]
    return model, {**checkpoint["arch"], "lowrank": ranks}, metrics
