"""Latency-aware pruning: the fast-width rule per ISA, the greedy plan over a measured table, and
pruning a real (tiny) CIFAR ResNet to a budget with the teacher's surviving weights."""

import pytest
import torch

from resnet_slim.compress.channel_removal import narrow_blocks
from resnet_slim.compress.latency_prune import block_widths, narrowing_costs, plan_to_budget
from resnet_slim.errors import UserError
from resnet_slim.hardware import fast_int8_conv, fast_int8_widths, int8_out_multiple

AVX2 = {"avx2", "fma"}
AVX2_VNNI = {"avx2", "avx_vnni"}
AVX512 = {"avx2", "avx512f", "avx512bw", "avx512_vnni"}


@pytest.mark.parametrize(
    ("flags", "multiple", "widths"),
    [
        (AVX2, 8, [16, 24, 32, 40, 48]),
        (AVX2_VNNI, 8, [16, 24, 32, 40, 48]),
        (AVX512, 4, [16, 20, 24, 28, 32, 36, 40, 44, 48]),
    ],
)
def test_fast_widths_follow_the_isa_rule(flags, multiple, widths):
    assert int8_out_multiple(flags) == multiple
    assert fast_int8_widths(48, flags) == widths
    # a width MLAS's symmetric conv refuses is never offered: out < 16, out % multiple, in % 4
    for width in range(1, 129):
        fast = fast_int8_conv(width, width, flags)
        assert fast == (width >= 16 and width % multiple == 0 and width % 4 == 0)
        assert (width in fast_int8_widths(128, flags)) == fast
    assert not fast_int8_conv(6, 16, flags)  # in % 4 != 0
    assert fast_int8_widths(15, flags) == []


def test_block_widths_keep_the_own_width_and_at_most_steps():
    spec = {"kind": "basic", "in": 64, "mid": 64, "out": 64, "stride": 1, "size": 8}
    widths = block_widths(spec, steps=4, flags=AVX2)
    assert widths[-1] == 64 and len(widths) == 4 and widths[0] == 16
    assert all(fast_int8_conv(w, w, AVX2) for w in widths)
    # an odd own width (an imported model) stays allowed: the block may stay whole
    assert block_widths({**spec, "mid": 50}, steps=10, flags=AVX2) == [16, 24, 32, 40, 48, 50]
    assert block_widths({**spec, "mid": 12}, steps=3, flags=AVX2) == [12]


def _option(stage, times, costs, removal=None, params=None):
    option = {"stage": stage, "times": times, "costs": costs}
    if params is not None:
        option["params"] = params
    if removal is not None:
        option["removal"] = removal
    return option


def test_plan_takes_the_least_loss_per_millisecond_until_the_budget():
    options = {
        "layer1.0": _option("layer1", {16: 1.0}, {16: 0.0}, removal=0.5),
        "layer1.1": _option("layer1", {16: 1.0}, {16: 0.0}, removal=0.1),
        "layer2.0": _option("layer2", {16: 0.6, 32: 1.0}, {16: 0.05, 32: 0.0}),
    }
    # 3.0 ms + fixed 0.5 -> budget 3.2: one change; narrowing layer2.0 costs 0.05 / 0.4 ms =
    # 0.125 per ms, removing layer1.1 costs 0.1 / 1.0 ms = 0.1 per ms: removal wins
    plan = plan_to_budget(options, fixed_ms=0.5, budget_ms=3.2, allow_width=True, allow_depth=True)
    assert plan == {"layer1.0": 16, "layer1.1": None, "layer2.0": 32}
    # width only: the narrowing, whatever it costs
    plan = plan_to_budget(options, fixed_ms=0.5, budget_ms=3.2, allow_width=True, allow_depth=False)
    assert plan == {"layer1.0": 16, "layer1.1": 16, "layer2.0": 16}
    # a stage keeps one block: layer1 can lose only one of its two
    with pytest.raises(UserError, match="no plan meets the budget of 1.000 ms") as caught:
        plan_to_budget(options, fixed_ms=0.5, budget_ms=1.0, allow_width=True, allow_depth=True)
    assert "\n" not in str(caught.value)


def test_plan_never_takes_a_narrower_width_that_is_not_faster():
    # 24 is slower than 32 here (a slow kernel): the plan jumps to 16 or leaves the block whole
    options = {
        "layer2.1": _option(
            "layer2", {16: 0.5, 24: 1.2, 32: 1.0}, {16: 0.3, 24: 0.0, 32: 0.0}, removal=5.0
        )
    }
    plan = plan_to_budget(options, fixed_ms=0.0, budget_ms=0.9, allow_width=True, allow_depth=True)
    assert plan == {"layer2.1": 16}


def test_plan_meets_the_size_target_after_the_time_budget_by_least_loss_per_parameter():
    options = {
        # cheap in time, dear in parameters (a wide late block): the size phase's choice
        "layer1.0": _option("layer1", {16: 1.0}, {16: 0.0}, removal=0.2, params={16: 100}),
        "layer1.1": _option("layer1", {16: 1.0}, {16: 0.0}, removal=0.1, params={16: 100}),
        "layer3.0": _option(
            "layer3", {32: 0.3, 64: 0.4}, {32: 0.05, 64: 0.0}, params={32: 400, 64: 1000}
        ),
    }
    kwargs = {"fixed_ms": 0.0, "allow_width": True, "allow_depth": True, "fixed_params": 50}
    # time alone (2.4 -> 1.5 ms): layer1.1 goes (0.1 per ms); the model keeps 1,150 parameters
    assert plan_to_budget(options, budget_ms=1.5, **kwargs) == {
        "layer1.0": 16,
        "layer1.1": None,
        "layer3.0": 64,
    }
    # and at most 600 parameters: layer3.0 narrowed (0.05 / 600 saved) rather than layer1.0
    # removed (which a stage's last block cannot be anyway)
    plan = plan_to_budget(options, budget_ms=1.5, max_params=600, **kwargs)
    assert plan == {"layer1.0": 16, "layer1.1": None, "layer3.0": 32}
    # a size no plan reaches is one line naming the smallest reachable
    with pytest.raises(UserError, match="no plan has at most 100 parameters") as caught:
        plan_to_budget(options, budget_ms=1.5, max_params=100, **kwargs)
    assert "\n" not in str(caught.value) and "550" in str(caught.value)


def test_plan_gives_back_what_the_last_step_took_beyond_the_need():
    options = {
        # cheapest per parameter first, but 100 saved is not enough
        "layer3.0": _option(
            "layer3", {32: 0.2, 64: 0.4}, {32: 0.01, 64: 0.0}, params={32: 100, 64: 200}
        ),
        # then this removal saves 500 where 100 more were missing
        "layer3.1": _option("layer3", {64: 0.4}, {64: 0.0}, removal=0.2, params={64: 500}),
        "layer3.2": _option("layer3", {64: 0.4}, {64: 0.0}, removal=0.9, params={64: 500}),
    }
    kwargs = {"fixed_ms": 0.0, "budget_ms": 10.0, "allow_width": True, "allow_depth": True}
    plan = plan_to_budget(options, max_params=1000, **kwargs)
    # layer3.0 narrowed (1,100 left), layer3.1 removed (600): layer3.0 gets its width back (700)
    assert plan == {"layer3.0": 64, "layer3.1": None, "layer3.2": 64}
    # no room for it: stays narrowed (the plan is never over the size target or the budget)
    plan = plan_to_budget(options, max_params=650, **kwargs)
    assert plan == {"layer3.0": 32, "layer3.1": None, "layer3.2": 64}
    plan = plan_to_budget(options, max_params=1000, **{**kwargs, "budget_ms": 0.7})
    assert plan == {"layer3.0": 32, "layer3.1": None, "layer3.2": 64}  # 0.6 ms; 0.8 with 64


def _tiny_resnet(seed=0):
    from resnet_slim.train.architectures import CifarResNet

    torch.manual_seed(seed)
    model = CifarResNet(depth=20, num_classes=10, width=16).eval()
    with torch.no_grad():  # distinct gammas, so the lowest-|γ| order is defined
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.1, 1.0)
                module.running_var.uniform_(0.5, 1.5)
    return model


def test_narrowing_cost_is_that_of_removing_the_channels():
    model = _tiny_resnet()
    images, labels = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    costs = narrowing_costs(model, images, labels, {"layer3.1": [16, 32, 64]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored
    assert costs["layer3.1"][64] == pytest.approx(0.0, abs=1e-6)
    # silencing the 48 lowest-|γ| channels gives exactly the loss of the model without them
    narrowed = narrow_blocks(model, {"layer3.1": 16}, image_size=8)
    assert narrowed.layer3[1].conv1.out_channels == 16
    assert narrowed.layer3[1].conv2.in_channels == 16
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(model(images), labels).item()
        cut = torch.nn.functional.cross_entropy(narrowed(images), labels).item()
    assert costs["layer3.1"][16] == pytest.approx(cut - base, abs=1e-4)
    assert costs["layer3.1"][16] != pytest.approx(0.0, abs=1e-4)  # the check can fail


def test_narrow_blocks_keeps_the_largest_gammas_and_their_weights():
    model = _tiny_resnet()
    narrowed = narrow_blocks(model, {"layer2.2": 16}, image_size=8)
    gammas = model.layer2[2].bn1.weight.detach()
    kept = torch.sort(torch.argsort(gammas.abs(), descending=True)[:16]).values
    assert torch.equal(narrowed.layer2[2].bn1.weight.detach(), gammas[kept])
    assert torch.equal(
        narrowed.layer2[2].conv2.weight.detach(), model.layer2[2].conv2.weight.detach()[:, kept]
    )
    assert model.layer2[2].conv1.out_channels == 32  # the input model is untouched
    with pytest.raises(UserError, match="cannot keep 40 of its 32"):
        narrow_blocks(model, {"layer2.2": 40}, image_size=8)


def _mac_table(model) -> dict:
    """A table pricing every unit the pruner may produce by its MACs (1 ms per 10 M), so a plan is
    a deterministic function of the model."""
    from resnet_slim.compress.latency_model import table_units_for, unit_key

    units = {}
    for spec in table_units_for(model, 8, lambda s: block_widths(s, steps=4)):
        size = spec["size"] // spec.get("stride", 1)
        macs = 9 * (
            spec.get("in", 3) * spec.get("mid", 16) + spec.get("mid", 16) * spec.get("out", 16)
        )
        ms = max(macs * size * size / 1e7, 1e-3)
        units[unit_key(spec)] = {"spec": spec, "int8_ms": ms, "fp32_ms": 2 * ms}
    return {"units": units, "constant_ms": {"int8": 0.01, "fp32": 0.01}}


@pytest.mark.parametrize(("rounds", "max_params_ratio"), [(1, None), (3, None), (2, 0.3)])
def test_rounds_reprice_the_pruned_model_and_meet_the_budget(monkeypatch, rounds, max_params_ratio):
    from resnet_slim.compress import latency_prune
    from resnet_slim.params import LatencyPruneParams
    from resnet_slim.train.models import build_model, make_arch

    model = _tiny_resnet()
    arch = make_arch(name="cifar_resnet", num_classes=10, depth=20, width=16)
    table = _mac_table(model)
    priced = []
    original = latency_prune._block_options

    def spy(current, *args):
        priced.append(sum(1 for s in current.modules() if s.__class__.__name__ == "BasicBlock"))
        return original(current, *args)

    monkeypatch.setattr(latency_prune, "_block_options", spy)
    p = LatencyPruneParams(
        structure="depth_width",
        speedup=4.0,
        width_steps=4,
        cost_images=32,
        rounds=rounds,
        max_params_ratio=max_params_ratio,
    )
    images, labels = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    pruned, pruned_arch, plan = latency_prune.prune_to_latency(
        model, arch, table=table, p=p, image_size=8, images=images, labels=labels
    )
    assert len(priced) == rounds and priced[0] == 9
    if rounds > 1:
        assert priced[-1] < 9  # later rounds priced the model as already pruned
    assert plan["pruned_predicted_int8_ms"] <= plan["budget_int8_ms"]
    count = sum(t.numel() for t in pruned.parameters())
    assert plan["pruned_params"] == count
    assert plan["teacher_params"] == sum(t.numel() for t in model.parameters())
    if max_params_ratio is not None:  # the size target met, by the pruned model's real count
        assert plan["max_params"] == int(plan["teacher_params"] * max_params_ratio)
        assert count <= plan["max_params"]
    assert set(plan["blocks"]) == {f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)}
    for name, block in plan["blocks"].items():
        changed = block["width"] is None or block["width"] < max(block["narrowing_costs"])
        assert (block["round"] in range(1, rounds + 1)) == changed, name
        assert (block["new_name"] is None) == (block["width"] is None)
    rebuilt = build_model(pruned_arch, image_size=8)
    rebuilt.load_state_dict(pruned.state_dict())  # the record describes the pruned model
    assert rebuilt(images[:2]).shape == (2, 10)


def test_a_student_is_fitted_to_the_teachers_budget_and_size():
    from resnet_slim.compress import latency_prune
    from resnet_slim.compress.latency_model import model_units, predict_ms
    from resnet_slim.params import LatencyPruneParams
    from resnet_slim.train.architectures import CifarResNet
    from resnet_slim.train.models import build_model, make_arch

    torch.manual_seed(1)
    teacher = CifarResNet(depth=32, num_classes=10, width=16).eval()  # 5 blocks per stage
    student = _tiny_resnet()  # ResNet-20: 3 per stage, the teacher's widths
    arch = make_arch(name="cifar_resnet", num_classes=10, depth=20, width=16)
    table = _mac_table(teacher)
    p = LatencyPruneParams(
        structure="depth_width",
        speedup=4.0,
        width_steps=4,
        cost_images=32,
        rounds=1,
        max_params_ratio=0.3,
    )
    images, labels = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    fitted, fitted_arch, plan = latency_prune.prune_to_latency(
        student,
        arch,
        table=table,
        p=p,
        image_size=8,
        images=images,
        labels=labels,
        reference=teacher,
    )
    teacher_count = sum(t.numel() for t in teacher.parameters())
    # the budget and the size target are the teacher's, not the student's own
    assert plan["budget_int8_ms"] == pytest.approx(
        predict_ms(model_units(teacher, 8), table, "fp32") / 4.0
    )
    assert plan["teacher_params"] == teacher_count
    assert plan["start_params"] == sum(t.numel() for t in student.parameters())
    assert plan["start_params"] > 0.3 * teacher_count  # so the size target had work to do
    assert plan["pruned_params"] == sum(t.numel() for t in fitted.parameters())
    assert plan["pruned_params"] <= int(0.3 * teacher_count)
    assert plan["pruned_predicted_int8_ms"] <= plan["budget_int8_ms"]
    assert set(plan["blocks"]) == {f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)}
    rebuilt = build_model(fitted_arch, image_size=8)
    rebuilt.load_state_dict(fitted.state_dict())
    assert rebuilt(images[:2]).shape == (2, 10)
