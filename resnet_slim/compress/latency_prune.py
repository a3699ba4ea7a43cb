"""Latency-aware pruning: which residual blocks to remove and how narrow to make the others, so
that the pruned model's INT8 latency, predicted from a table measured on this CPU, meets a budget
at the least accuracy cost.

Why not a MAC ratio: at CIFAR sizes per-operator cost dominates and onnxruntime's fast INT8 conv
runs only at some widths (resnet_slim/hardware.py), so a model with half the MACs can be slower
(../shared/FACTS.md). Here every choice is priced in measured milliseconds (the latency_table
stage, compress/latency_model.py) and in measured accuracy: the validation loss increase when one
block is bypassed (compress/depth.py) or narrowed (its lowest-|γ| inner channels silenced). A greedy
pass over that table (like NetAdapt's and HALP's, arXiv:1804.03230, 2110.10811, on a CPU) takes the
change with the least loss per millisecond saved until the prediction meets the budget. The costs
are first-order (each measured alone on the teacher); the fine-tune that follows recovers.
"""

import numpy as np
import torch
from torch import nn

from resnet_slim.compress import depth
from resnet_slim.compress.channel_removal import narrow_blocks
from resnet_slim.compress.latency_model import (
    block_spec_at,
    model_units,
    predict_ms,
    unit_key,
    unit_ms,
)
from resnet_slim.data import loader as data
from resnet_slim.errors import UserError
from resnet_slim.hardware import fast_int8_widths
from resnet_slim.params import LatencyPruneParams
from resnet_slim.train.models import channel_record


def block_widths(spec: dict, *, steps: int, flags: set[str] | None = None) -> list[int]:
    """Inner widths a block may get: the fast INT8 widths up to its own (always kept, so a block
    can stay whole), at most `steps` of them, evenly spread over that range."""
    widths = [w for w in fast_int8_widths(spec["mid"], flags) if w < spec["mid"]]
    if len(widths) > steps - 1:
        picks = np.linspace(0, len(widths) - 1, max(steps - 1, 0)).round().astype(int)
        widths = [widths[i] for i in sorted(set(picks.tolist()))]
    return [*widths, spec["mid"]]


@torch.no_grad()
def narrowing_costs(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, widths: dict[str, list[int]]
) -> dict[str, dict[int, float]]:
    """{block: {width: validation loss increase}} when only that block keeps `width` inner channels
    (its lowest bn1 |γ| ones silenced: γ = β = 0 gives ReLU(0) = 0, exactly a removed channel)."""
    base = depth.mean_loss(model, images, labels)
    costs = {}
    for name, choices in widths.items():
        bn = model.get_submodule(name).bn1
        order = torch.argsort(bn.weight.abs(), stable=True)
        saved = bn.weight.clone(), bn.bias.clone()
        costs[name] = {}
        try:
            for width in choices:
                silenced = order[: bn.num_features - width]
                bn.weight[silenced], bn.bias[silenced] = 0.0, 0.0
                costs[name][width] = depth.mean_loss(model, images, labels) - base
                bn.weight.copy_(saved[0])
                bn.bias.copy_(saved[1])
        finally:
            bn.weight.copy_(saved[0])
            bn.bias.copy_(saved[1])
    return costs


def _moves(name: str, width: int, options: dict, allow_width: bool, allow_depth: bool):
    """(target width or None = remove, extra loss, ms saved, parameters saved) of every change to
    one block."""
    times, costs, removal = options["times"], options["costs"], options.get("removal")
    params = options.get("params") or dict.fromkeys(costs, 0)
    moves = []
    if allow_width:
        moves += [
            (w, costs[w] - costs[width], times[width] - times[w], params[width] - params[w])
            for w in costs
            if w < width
        ]
    if allow_depth and removal is not None:
        moves.append((None, removal - costs[width], times[width], params[width]))
    return moves


def plan_to_budget(
    options: dict[str, dict],
    *,
    fixed_ms: float,
    budget_ms: float,
    allow_width: bool,
    allow_depth: bool,
    fixed_params: int = 0,
    max_params: int | None = None,
) -> dict[str, int | None]:
    """{block: inner width kept, or None = removed} meeting `budget_ms` (and `max_params`),
    greedily.

    options[block]: "times" {width: ms}, "costs" {width: loss increase}, "params" {width:
    parameter count} (needed with max_params), "removal" (loss increase when removed; absent if
    the block cannot go) and "stage". `fixed_ms` / `fixed_params`: what the plan cannot change
    (stem, head, the per-call constant). While the time is over budget each step takes the change
    with the least loss per millisecond saved (a change that saves no time is never taken: fewer
    MACs at no gain); then, while the model has more than `max_params` parameters (the gate's size
    target), the least loss per parameter saved. A stage always keeps one block. Then what the
    last steps took beyond the need is given back (_give_back). A budget no plan meets is a
    one-line error.
    """
    state = {name: max(o["costs"]) for name, o in options.items()}

    def predicted() -> float:
        return fixed_ms + sum(options[n]["times"][w] for n, w in state.items() if w is not None)

    def parameters() -> int:
        return fixed_params + sum(
            options[n]["params"][w] for n, w in state.items() if w is not None
        )

    def over_size() -> bool:
        return max_params is not None and parameters() > max_params

    while predicted() > budget_ms or over_size():
        by_time = predicted() > budget_ms  # time first; size once the time is met
        alive = {}
        for name, width in state.items():
            if width is not None:
                alive[options[name]["stage"]] = alive.get(options[name]["stage"], 0) + 1
        best = None
        for name, width in state.items():
            if width is None:
                continue
            for target, cost, saved_ms, saved_params in _moves(
                name,
                width,
                options[name],
                allow_width,
                allow_depth and alive[options[name]["stage"]] > 1,
            ):
                saved = saved_ms if by_time else saved_params
                if saved <= 0 or saved_ms < 0:  # never slower for size (a slow-kernel width)
                    continue
                key = (max(cost, 0.0) / saved, -saved, name)
                if best is None or key < best[0]:
                    best = (key, name, target)
        if best is None:
            if by_time:
                raise UserError(
                    f"prune.latency: no plan meets the budget of {budget_ms:.3f} ms (predicted "
                    f"INT8); the fastest reachable is {predicted():.3f} ms: lower "
                    f"prune.latency.speedup or allow structure depth_width"
                )
            raise UserError(
                f"prune.latency: no plan has at most {max_params:,} parameters; the smallest "
                f"reachable has {parameters():,}: raise prune.latency.max_params_ratio or allow "
                f"structure depth_width"
            )
        state[best[1]] = best[2]
    _give_back(
        state,
        options,
        within=lambda: predicted() <= budget_ms and not over_size(),
        allow_width=allow_width,
    )
    return state


def _give_back(state: dict, options: dict, *, within, allow_width: bool) -> None:
    """Undo what the greedy no longer needs, in place: its last step can overshoot (removing a
    wide block for the size target frees more parameters than were missing), so while a narrowed
    or removed block can get a wider width and the plan still meets budget and size, take the
    change that gives back the most loss."""

    def loss(name, width):
        return options[name].get("removal") if width is None else options[name]["costs"][width]

    while True:
        best = None
        for name, width in state.items():
            targets = [w for w in options[name]["costs"] if width is None or w > width]
            if not allow_width:  # depth only: a removed block comes back whole
                targets = [max(options[name]["costs"])] if width is None else []
            for target in targets:
                gain = loss(name, width) - loss(name, target)
                state[name] = target
                fits = within()
                state[name] = width
                if fits and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, name, target)
        if best is None:
            return
        state[best[1]] = best[2]


def _parameter_count(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters())


def _block_params(block: nn.Module, widths: list[int]) -> dict[int, int]:
    """{inner width: the block's parameter count at it}: each inner channel is a conv1 filter,
    its BN's scale and shift and a conv2 input slice."""
    per_channel = block.conv1.weight[0].numel() + 2 + block.conv2.weight[:, 0].numel()
    whole, own = _parameter_count(block), block.conv1.out_channels
    return {w: whole - (own - w) * per_channel for w in widths}


def _block_options(model, image_size, table, p, images, labels) -> tuple[dict, float, int]:
    """(every block's priced choices, the fixed INT8 ms, the fixed parameter count), for
    plan_to_budget."""
    specs = model_units(model, image_size)
    blocks = [s for s in specs if s["kind"] == "basic"]
    fixed = predict_ms([s for s in specs if s["kind"] != "basic"], table, "int8")
    widths = {s["name"]: block_widths(s, steps=p.width_steps) for s in blocks}
    costs = narrowing_costs(model, images, labels, widths)
    removal = {}
    if p.structure != "width":
        removal = depth.block_removal_costs(model, images, labels)
    modules = dict(model.named_modules())
    options = {}
    for spec in blocks:
        name = spec["name"]
        options[name] = {
            "stage": name.split(".")[0],
            "costs": costs[name],
            "times": {w: unit_ms(block_spec_at(spec, w), table, "int8") for w in widths[name]},
            "params": _block_params(modules[name], widths[name]),
            **({"removal": removal[name]} if name in removal else {}),
        }
    fixed_params = _parameter_count(model) - sum(
        _parameter_count(modules[s["name"]]) for s in blocks
    )
    return options, fixed, fixed_params


def prune_to_latency(
    model: nn.Module,
    arch: dict,
    *,
    table: dict,
    p: LatencyPruneParams,
    image_size: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    reference: nn.Module | None = None,
) -> tuple[nn.Module, dict, dict]:
    """(pruned model, its architecture record, the plan's record) for the budget
    `teacher FP32 / p.speedup` (the teacher's measured FP32 time when the table has it, the
    predicted one otherwise: the gate compares with the measured teacher), removing blocks and /
    or narrowing them (p.structure), priced on `images` (validation). `model` is not modified.
    `reference`: the teacher when `model` is another network fitted to the teacher's budget (a
    student); by default `model` is the teacher itself.

    With p.max_params_ratio it also prunes until the model has at most that share of the
    teacher's parameters (the gate's size target; time first, then size, each by least loss).
    In p.rounds rounds: each prices the model as it is now and plans an equal share of the way
    from the model's predicted INT8 time (and parameter count) to the budget. Blocks that are
    each cheap to lose alone can be dear together (a whole stage emptied); re-pricing after each
    round sees that."""
    teacher = model if reference is None else reference
    teacher_ms = {
        rt: predict_ms(model_units(teacher, image_size), table, rt) for rt in ("fp32", "int8")
    }
    measured = table.get("teacher_measured_ms") or {}
    budget = (measured.get("fp32") or teacher_ms["fp32"]) / p.speedup
    teacher_params = _parameter_count(teacher)
    start_ms = predict_ms(model_units(model, image_size), table, "int8")
    start_params = _parameter_count(model)
    max_params = None
    if p.max_params_ratio is not None:
        max_params = int(teacher_params * p.max_params_ratio)
    blocks: dict[str, dict] = {}  # by the teacher's block names
    current = {  # block names in `model` -> their names now
        s["name"]: s["name"] for s in model_units(model, image_size) if s["kind"] == "basic"
    }
    pruned, pruned_arch = model, arch
    for step in range(1, p.rounds + 1):
        step_budget = start_ms - (start_ms - budget) * step / p.rounds
        step_params = None
        if max_params is not None:
            step_params = start_params - (start_params - max_params) * step // p.rounds
        options, fixed, fixed_params = _block_options(pruned, image_size, table, p, images, labels)
        plan = plan_to_budget(
            options,
            fixed_ms=fixed,
            budget_ms=step_budget,
            allow_width=p.structure != "depth",
            allow_depth=p.structure != "width",
            fixed_params=fixed_params,
            max_params=step_params,
        )
        pruned, pruned_arch, renamed = _apply_plan(pruned, pruned_arch, plan, options, image_size)
        for teacher_name, name in current.items():
            if name is None:
                continue
            entry = blocks.setdefault(teacher_name, _priced(options[name]))
            if plan[name] != max(options[name]["costs"]):
                entry["round"] = step
            entry["width"], current[teacher_name] = plan[name], renamed.get(name)
    for teacher_name, name in current.items():
        blocks[teacher_name]["new_name"] = name
    return (
        pruned,
        pruned_arch,
        {
            "budget_int8_ms": budget,
            "teacher_predicted_ms": teacher_ms,
            "teacher_measured_ms": measured or None,
            "pruned_predicted_int8_ms": predict_ms(model_units(pruned, image_size), table, "int8"),
            "structure": p.structure,
            "speedup": p.speedup,
            "rounds": p.rounds,
            "teacher_params": teacher_params,
            "start_params": start_params,
            "start_predicted_int8_ms": start_ms,
            "max_params": max_params,
            "pruned_params": _parameter_count(pruned),
            "blocks": blocks,
            "table_keys": sorted({unit_key(s) for s in model_units(pruned, image_size)}),
        },
    )


def prune_on_validation(
    model: nn.Module,
    arch: dict,
    *,
    table: dict | None,
    p: LatencyPruneParams,
    prepared_dir,
    image_size: int,
    reference: nn.Module | None = None,
    needed_by: str,
) -> tuple[nn.Module, dict, dict]:
    """prune_to_latency with every choice priced on the first p.cost_images validation images of
    the prepared data: what slim_prune does to the teacher and distill_student (fit_to_budget) to
    the initial student. `needed_by` names the setting in the error when the table is missing."""
    if table is None:
        raise UserError(f"{needed_by} needs the latency table (the latency_table stage)")
    images, labels = data.normalized_split(prepared_dir, "val")
    return prune_to_latency(
        model,
        arch,
        table=table,
        p=p,
        image_size=image_size,
        images=images[: p.cost_images],
        labels=labels[: p.cost_images],
        reference=reference,
    )


def _priced(option: dict) -> dict:
    """A block's record: its prices when first seen (on the teacher), its fate filled in later."""
    return {
        "width": max(option["costs"]),
        "round": None,
        "removal_cost": option.get("removal"),
        "narrowing_costs": option["costs"],
        "ms": option["times"],
    }


def _apply_plan(model, arch, plan: dict, options: dict, image_size: int):
    """(the model with the plan's blocks removed and narrowed, its record, {old: new name})."""
    removed = [name for name, width in plan.items() if width is None]
    pruned, pruned_arch = depth.remove_blocks(model, arch, removed) if removed else (model, arch)
    renamed = _renumbered(list(plan), removed)
    narrow = {
        renamed[name]: width
        for name, width in plan.items()
        if width is not None and width < max(options[name]["costs"])
    }
    if not narrow:
        return pruned, pruned_arch, renamed
    pruned = narrow_blocks(pruned, narrow, image_size=image_size)
    return pruned, {**pruned_arch, "channels": channel_record(pruned)}, renamed


def _renumbered(names: list[str], removed: list[str]) -> dict[str, str]:
    """{old block name: its name after `removed` are gone} ("layer2.5" -> "layer2.3")."""
    renamed, next_index = {}, {}
    for name in names:
        if name in removed:
            continue
        stage = name.rsplit(".", 1)[0]
        renamed[name] = f"{stage}.{next_index.get(stage, 0)}"
        next_index[stage] = next_index.get(stage, 0) + 1
    return renamed
