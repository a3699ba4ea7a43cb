"""Channel pruning (network slimming, L1 filters) and unstructured magnitude pruning.

Network slimming (Liu et al. 2017, arXiv:1708.06519): train with an L1 penalty on every BN scale
γ so that unimportant channels drift to γ ≈ 0, rank channels by |γ| (globally across layers),
physically remove the lowest (resnet_slim/compress/channel_removal.py: torch-pruning's dependency
graph, so coupled channels go together and the result is a plain, smaller `nn.Module`), then
fine-tune.

The slim_prune stage's work is `slim_prune_and_finetune`; the lowrank stage's, its like-for-like
alternative at the same parameter budget, is `lowrank.factorize_and_finetune`.
"""

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from resnet_slim.compress.channel_removal import prune_channels
from resnet_slim.compress.latency_prune import prune_on_validation
from resnet_slim.data import loader as data
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path
from resnet_slim.params import BaseParams, PruneParams
from resnet_slim.train import distributed, engine
from resnet_slim.train.models import build_model, channel_record, load_model

# the models' classifiers (architectures.ResNet: fc, architectures.CifarResNet: linear): classes are
# never pruned
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


# ---------------------------------------------------------------- the stage's work


def slim_prune_and_finetune(
    *,
    teacher_path: str | Path,
    prepared_dir: str | Path,
    reports: str | Path,
    p: PruneParams,
    base: BaseParams,
    device: torch.device,
    latency_table: dict | None = None,
) -> tuple[nn.Module, dict, dict, list[dict]] | None:
    """The slim_prune stage's work: sparsity training (bn_slimming), channel removal (or magnitude
    zeroing, or with method latency a plan to a budget priced by `latency_table`), fine-tuning (KD
    with prune.kd_alpha > 0) on `device`, DVCLive logs under `reports`.

    Returns (pruned plain CPU model, its architecture record, metrics, kept-channel rows) on rank
    0 and None on the other ranks, which write nothing (and so skip the MAC counts).
    """
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
    where = dict(
        device=device, prepared_dir=prepared_dir, val_loader=val_loader, reports=reports, base=base
    )
    if p.method == "bn_slimming" and p.sparsity.epochs > 0:
        model = _sparsity_phase(model, p, where)
        top1["after_sparsity"] = engine.evaluate(model, test_loader)["top1"]
    if p.method == "latency":
        pruned, arch, plan = prune_on_validation(
            model,
            checkpoint["arch"],
            table=latency_table,
            p=p.latency,
            prepared_dir=prepared_dir,
            image_size=size,
            needed_by="prune.method latency",
        )
        keep_zeros = None
    else:
        (pruned, keep_zeros), arch, plan = _removal_phase(model, p, image_size=size), None, None
    top1["after_removal"] = engine.evaluate(pruned, test_loader)["top1"]
    pruned, history = _finetune_phase(pruned, teacher, p, keep_zeros, where)
    top1["after_finetune"] = engine.evaluate(pruned, test_loader)["top1"]
    if not distributed.is_main_process():
        return None
    val_top1["after_finetune"] = history[-1]["val_top1"]
    metrics, rows = _pruning_metrics(
        teacher.cpu(), pruned, p, size, top1=top1, val_top1=val_top1, plan=plan
    )
    return (
        pruned,
        {**(arch or checkpoint["arch"]), "channels": channel_record(pruned)},
        metrics,
        rows,
    )


def _fit_phase(
    model, phase, desc, loss_fn, after_backward, *, device, prepared_dir, val_loader, reports, base
):
    """One training phase on `device`, its own batch size and DVCLive folder (`desc`); returns
    (plain CPU model, history) as engine.fit_on does."""
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


def _sparsity_phase(model: nn.Module, p, where: dict) -> nn.Module:
    """Network slimming's sparsity training: the L1 term on BN γ drives unneeded channels to 0."""
    model, _ = _fit_phase(
        model,
        p.sparsity,
        "sparsity",
        engine.cross_entropy(p.sparsity.label_smoothing),
        bn_l1_hook(p.sparsity.l1_lambda),
        **where,
    )
    return model


def _removal_phase(model: nn.Module, p, *, image_size: int) -> tuple[nn.Module, Callable | None]:
    """(the pruned copy, the fine-tuning hook that keeps zeroed weights at 0, or None).

    Every process removes the same weights: DDP kept them equal on all ranks (averaged gradients,
    BN statistics synced each epoch) and removal is a deterministic function of them; the DDP
    wrap for fine-tuning also checks shapes across ranks and broadcasts rank 0's values.
    """
    if p.method == "magnitude":
        pruned = prune_unstructured(model, ratio=p.ratio)
        return pruned, keep_zeros_hook(pruned)
    pruned = prune_channels(
        model,
        method=p.method,
        ratio=p.ratio,
        round_to=p.round_to,
        global_pruning=p.global_pruning,
        image_size=image_size,
        keep_residual_streams=p.keep_residual_streams,
    )
    return pruned, None


def _finetune_phase(
    pruned: nn.Module, teacher: nn.Module, p, keep_zeros, where: dict
) -> tuple[nn.Module, list[dict]]:
    """Recover the accuracy the removal cost (with the teacher's soft targets when kd_alpha > 0)."""
    return _fit_phase(
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
        **where,
    )


def _pruning_metrics(
    teacher: nn.Module, pruned: nn.Module, p, size: int, *, top1: dict, val_top1: dict, plan
) -> tuple[dict, list[dict]]:
    """(the stage's metrics, kept-channel rows): accuracy at each phase and what the pruned model
    costs against the teacher (MACs, parameters, non-zeros, channels; with method latency the
    plan: its budget, predictions and what became of each block)."""
    from resnet_slim.compress.export import (
        count_macs_params,
    )  # onnx: the training stages need it only here

    (t_macs, t_params), (s_macs, s_params) = (count_macs_params(m, size) for m in (teacher, pruned))
    rows = kept_channels(channel_record(teacher), _by_teacher_names(channel_record(pruned), plan))
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
    if plan is not None:
        metrics["latency_plan"] = plan
        metrics["blocks_removed"] = sum(b["width"] is None for b in plan["blocks"].values())
    return metrics, rows


def _by_teacher_names(record: dict, plan: dict | None) -> dict:
    """A pruned model's channel record keyed by the teacher's layer names: after blocks were
    removed the survivors are renumbered (the plan maps them), a removed block's layers are 0."""
    if plan is None:
        return record
    renamed = {}
    for block, entry in plan["blocks"].items():
        for layer in ("conv1", "bn1", "conv2", "bn2", "downsample.0", "downsample.1"):
            new = entry["new_name"]
            if new is None:
                renamed[f"{block}.{layer}"] = [0, 0]
            elif f"{new}.{layer}" in record:
                renamed[f"{block}.{layer}"] = record[f"{new}.{layer}"]
    return {**{k: v for k, v in record.items() if not k.startswith("layer")}, **renamed}
