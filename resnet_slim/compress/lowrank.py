"""Low-rank (SVD) factorization: a k×k conv becomes a k×k conv to r channels, then a 1×1 conv back.

A conv's weight, read as a matrix W (Cout × Cin·k·k), is replaced by its best rank-r approximation
(Eckart-Young: the truncated SVD U_r S_r V_rᵀ). The first conv carries sqrt(S_r)·V_rᵀ and the
second U_r·sqrt(S_r), so both factors have similar ranges (kinder to INT8 later). Linear layers
split the same way. Ranks come from one global energy threshold (the share of Σσ² each layer
keeps), found by bisection so the whole model meets a parameter budget — the like-for-like
comparison with channel pruning — and rounded up to multiples of `round_to` (int8 kernels).

The lowrank stage's work, factorizing the teacher and fine-tuning it, is `factorize_and_finetune`.
"""

from pathlib import Path

import torch
from torch import nn

from resnet_slim.compress.prune import count_nonzero
from resnet_slim.errors import UserError
from resnet_slim.params import BaseParams, LowrankParams
from resnet_slim.train import distributed, engine
from resnet_slim.train.models import load_model, low_rank_pair, replace_submodule


def _matrix(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def factorizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Plain convs (groups 1) and linears that may be split; the RGB stem (3 inputs) is left alone.

    A layer that a split would not shrink (a small classifier, say) is dropped later, by rank."""
    layers = {}
    for name, module in model.named_modules():
        # a fixed layer (a CIFAR ResNet's option-A shortcut, architectures.option_a_weight) stays
        # exact
        if (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.in_channels > 3
            and module.weight.requires_grad
        ):
            layers[name] = module
        elif isinstance(module, nn.Linear):
            layers[name] = module
    return layers


def _factor_params(module: nn.Module, rank: int) -> int:
    rows, cols = _matrix(module).shape
    return rank * (rows + cols)


def energy_curves(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per layer, the share of Σσ² that ranks 1, 2, … keep (one SVD each, reused by bisection)."""
    curves = {}
    for name, module in layers.items():
        sigma2 = torch.linalg.svdvals(_matrix(module).double()) ** 2
        curves[name] = torch.cumsum(sigma2, 0) / sigma2.sum().clamp_min(1e-30)
    return curves


def ranks_for_energy(
    layers: dict[str, nn.Module], curves: dict[str, torch.Tensor], energy: float, round_to: int
) -> dict[str, int]:
    """Smallest rank keeping `energy` of each layer's Σσ², rounded up to a multiple of `round_to`;
    layers it would not shrink are left out."""
    ranks = {}
    for name, module in layers.items():
        kept = curves[name]
        rank = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1
        rank = min(-(-rank // round_to) * round_to, len(kept))
        if _factor_params(module, rank) < module.weight.numel():
            ranks[name] = rank
    return ranks


def params_with_ranks(model: nn.Module, ranks: dict[str, int]) -> int:
    """Parameter count of `model` once the named layers are factorized to these ranks."""
    layers = dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters())
    return total - sum(
        layers[n].weight.numel() - _factor_params(layers[n], r) for n, r in ranks.items()
    )


def choose_ranks(
    model: nn.Module, *, params_ratio: float, round_to: int = 16, steps: int = 40
) -> dict[str, int]:
    """Per-layer ranks whose factorized model has ≤ `params_ratio` of the parameters (as close as
    one global energy threshold gets)."""
    if not 0.0 < params_ratio < 1.0:
        raise UserError(f"lowrank: params_ratio must be in (0, 1), got {params_ratio}")
    if round_to < 1:
        raise UserError(f"lowrank: round_to must be ≥ 1, got {round_to}")
    layers = factorizable_layers(model)
    curves = energy_curves(layers)
    total = sum(p.numel() for p in model.parameters())
    target = params_ratio * total
    lowest = ranks_for_energy(layers, curves, 0.0, round_to)
    if not lowest or params_with_ranks(model, lowest) > target:
        floor = params_with_ranks(model, lowest) / total
        raise UserError(
            f"lowrank: params_ratio {params_ratio} is out of reach: rank {round_to} in "
            f"every layer still keeps {floor:.3f} of the parameters (lower round_to or "
            f"raise params_ratio)"
        )
    low, high = 0.0, 1.0  # energy kept; params grow with it
    for _ in range(steps):
        mid = (low + high) / 2
        within = params_with_ranks(model, ranks_for_energy(layers, curves, mid, round_to)) <= target
        low, high = (mid, high) if within else (low, mid)
    return ranks_for_energy(layers, curves, low, round_to)


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UserError(f"lowrank: the model has no layer {name!r}") from None


@torch.no_grad()
def factorize_svd(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each named conv / linear by its truncated-SVD pair, in place; returns the model."""
    for name, rank in ranks.items():
        module = _get(model, name)
        full = min(_matrix(module).shape) if isinstance(module, (nn.Conv2d, nn.Linear)) else 0
        if getattr(module, "groups", 1) != 1 or not 1 <= rank <= full:
            raise UserError(
                f"lowrank: cannot factorize {name} ({module.__class__.__name__}) to "
                f"rank {rank}; plain convs / linears only, rank 1..{full}"
            )
        u, s, vh = torch.linalg.svd(_matrix(module).double(), full_matrices=False)
        root = s[:rank].sqrt()
        first = (root[:, None] * vh[:rank]).to(module.weight.dtype)  # rank × Cin·k·k
        second = (u[:, :rank] * root[None, :]).to(module.weight.dtype)  # Cout × rank
        pair = low_rank_pair(module, rank)
        pair[0].weight.copy_(first.reshape(pair[0].weight.shape))
        pair[1].weight.copy_(second.reshape(pair[1].weight.shape))
        if module.bias is not None:
            pair[1].bias.copy_(module.bias)
        replace_submodule(model, name, pair)
    return model


# ---------------------------------------------------------------- the stage's work


def factorize_and_finetune(
    *,
    teacher_path: str | Path,
    pruned_path: str | Path,
    prepared_dir: str | Path,
    reports: str | Path,
    p: LowrankParams,
    base: BaseParams,
    device: torch.device,
) -> tuple[nn.Module, dict, dict] | None:
    """The lowrank stage's work: SVD-factorize the teacher to lowrank.params_ratio of its
    parameters (match_pruned: the pruned model's share), then fine-tune on `device`, DVCLive logs
    under `reports`.

    Returns (plain CPU model, its architecture record, metrics) on rank 0 and None on the other
    ranks, which write nothing.
    """
    engine.seed_everything(base.seed, distributed.threads_per_process(base.threads))
    train_loader, val_loader, test_loader, meta = engine.rank_loaders(
        prepared_dir, batch_size=p.finetune.batch_size, base=base
    )
    num_classes, size = len(meta["class_names"]), meta["image_size"]
    teacher, checkpoint = load_model(teacher_path, num_classes=num_classes)
    model, _ = load_model(teacher_path, num_classes=num_classes)  # factorized in place
    target, pruned = _params_target(p.params_ratio, teacher, pruned_path, num_classes)
    # Every process gets the same ranks and factors: each loaded the same teacher file, and the
    # SVD of the same matrices on the same CPU is deterministic (fit_on's DDP wrap then checks
    # the shapes across ranks and broadcasts rank 0's values).
    ranks = choose_ranks(model, params_ratio=target, round_to=p.round_to)
    factorize_svd(model, ranks)

    top1 = {
        "before": engine.evaluate(teacher, test_loader)["top1"],
        "after_factorization": engine.evaluate(model, test_loader)["top1"],
    }
    model, history = _finetune(
        model, train_loader, val_loader, p, base=base, device=device, reports=reports
    )
    top1["after_finetune"] = engine.evaluate(model, test_loader)["top1"]
    if not distributed.is_main_process():
        return None
    metrics = _lowrank_metrics(
        teacher, model, pruned, size, p, target=target, ranks=ranks, top1=top1, history=history
    )
    return model, {**checkpoint["arch"], "lowrank": ranks}, metrics


def _params_target(
    params_ratio, teacher: nn.Module, pruned_path: str | Path, num_classes: int
) -> tuple[float, nn.Module | None]:
    """(the parameter share to reach, the pruned model when that share is match_pruned's).

    Non-zero counts: also right for a model pruned unstructured (magnitude)."""
    if params_ratio != "match_pruned":
        return params_ratio, None
    pruned, _ = load_model(pruned_path, num_classes=num_classes)
    return count_nonzero(pruned) / count_nonzero(teacher), pruned


def _finetune(model, train_loader, val_loader, p, *, base, device, reports):
    """(fine-tuned plain CPU model, history): recovers what factorization lost, on `device`."""
    return engine.fit_on(
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


def _lowrank_metrics(
    teacher: nn.Module,
    model: nn.Module,
    pruned: nn.Module | None,
    size: int,
    p,
    *,
    target: float,
    ranks: dict[str, int],
    top1: dict,
    history: list[dict],
) -> dict:
    """The stage's metrics: accuracy at each step, and MACs / parameters against the teacher (and
    the pruned model it was matched to), for the report's like-for-like comparison."""
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
    return metrics
