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
from resnet_slim.compress.latency_model import block_spec_at, model_units, predict_ms, unit_key
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
    """(target width or None = remove, extra loss, ms saved) of every change to one block."""
    times, costs, removal = options["times"], options["costs"], options.get("removal")
    moves = []
    if allow_width:
        moves += [(w, costs[w] - costs[width], times[width] - times[w]) for w in costs if w < width]
    if allow_depth and removal is not None:
        moves.append((None, removal - costs[width], times[width]))
    return [(target, cost, saved) for target, cost, saved in moves if saved > 0]


def plan_to_budget(
    options: dict[str, dict],
    *,
    fixed_ms: float,
    budget_ms: float,
    allow_width: bool,
    allow_depth: bool,
) -> dict[str, int | None]:
    """{block: inner width kept, or None = removed} meeting `budget_ms`, greedily.

    options[block]: "times" {width: ms}, "costs" {width: loss increase}, "removal" (loss increase
    when removed; absent if the block cannot go) and "stage". `fixed_ms`: what the plan cannot
    change (stem, head, the per-call constant). Each step takes the change with the least loss per
    millisecond saved (a change that saves nothing is never taken: fewer MACs at no gain); a
    stage always keeps one block. A budget no plan meets is a one-line error.
    """
    state = {name: max(o["costs"]) for name, o in options.items()}

    def predicted() -> float:
        return fixed_ms + sum(options[n]["times"][w] for n, w in state.items() if w is not None)

    while predicted() > budget_ms:
        alive = {}
        for name, width in state.items():
            if width is not None:
                alive[options[name]["stage"]] = alive.get(options[name]["stage"], 0) + 1
        best = None
        for name, width in state.items():
            if width is None:
                continue
            for target, cost, saved in _moves(
                name,
                width,
                options[name],
                allow_width,
                allow_depth and alive[options[name]["stage"]] > 1,
            ):
                key = (max(cost, 0.0) / saved, -saved, name)
                if best is None or key < best[0]:
                    best = (key, name, target)
        if best is None:
            raise UserError(
                f"prune.latency: no plan meets the budget of {budget_ms:.3f} ms (predicted INT8); "
                f"the fastest reachable is {predicted():.3f} ms: lower prune.latency.speedup or "
                f"allow structure depth_width"
            )
        state[best[1]] = best[2]
    return state


def _unit_ms(spec: dict, table: dict) -> float:
    """What one unit adds to a model's predicted INT8 time (the per-call constant left out)."""
    return predict_ms([spec], table, "int8") - predict_ms([], table, "int8")


def _block_options(model, image_size, table, p, images, labels) -> tuple[dict, float]:
    """(every block's priced choices, the fixed INT8 ms), for plan_to_budget."""
    specs = model_units(model, image_size)
    blocks = [s for s in specs if s["kind"] == "basic"]
    fixed = predict_ms([s for s in specs if s["kind"] != "basic"], table, "int8")
    widths = {s["name"]: block_widths(s, steps=p.width_steps) for s in blocks}
    costs = narrowing_costs(model, images, labels, widths)
    removal = {}
    if p.structure != "width":
        removal = depth.block_removal_costs(model, images, labels)
    options = {}
    for spec in blocks:
        name = spec["name"]
        options[name] = {
            "stage": name.split(".")[0],
            "costs": costs[name],
            "times": {w: _unit_ms(block_spec_at(spec, w), table) for w in widths[name]},
            **({"removal": removal[name]} if name in removal else {}),
        }
    return options, fixed


def prune_to_latency(
    model: nn.Module,
    arch: dict,
    *,
    table: dict,
    p: LatencyPruneParams,
    image_size: int,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[nn.Module, dict, dict]:
    """(pruned model, its architecture record, the plan's record) for the budget
    `teacher FP32 / p.speedup` (the teacher's measured FP32 time when the table has it, the
    predicted one otherwise: the gate compares with the measured teacher), removing blocks and /
    or narrowing them (p.structure), priced on `images` (validation). `model` is not modified.

    In p.rounds rounds: each prices the model as it is now and plans an equal share of the way
    from the teacher's predicted INT8 time to the budget. Blocks that are each cheap to lose alone
    can be dear together (a whole stage emptied); re-pricing after each round sees that."""
    units = model_units(model, image_size)
    teacher_ms = {rt: predict_ms(units, table, rt) for rt in ("fp32", "int8")}
    measured = table.get("teacher_measured_ms") or {}
    budget = (measured.get("fp32") or teacher_ms["fp32"]) / p.speedup
    blocks: dict[str, dict] = {}  # by the teacher's block names
    current = {s["name"]: s["name"] for s in units if s["kind"] == "basic"}  # -> name now
    pruned, pruned_arch = model, arch
    for step in range(1, p.rounds + 1):
        step_budget = teacher_ms["int8"] - (teacher_ms["int8"] - budget) * step / p.rounds
        options, fixed = _block_options(pruned, image_size, table, p, images, labels)
        plan = plan_to_budget(
            options,
            fixed_ms=fixed,
            budget_ms=step_budget,
            allow_width=p.structure != "depth",
            allow_depth=p.structure != "width",
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
            "blocks": blocks,
            "table_keys": sorted({unit_key(s) for s in model_units(pruned, image_size)}),
        },
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
