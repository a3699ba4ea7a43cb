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


def _option(stage, times, costs, removal=None):
    option = {"stage": stage, "times": times, "costs": costs}
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
