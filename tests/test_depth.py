"""Depth pruning: which residual blocks can go, what bypassing each costs, and the shallower model
with its `blocks` record, which rebuilds it exactly (resnet_slim/compress/depth.py, the `blocks`
key of train/models.py and train/model_bounds.py)."""

import copy

import pytest
import torch
from torch import nn

from resnet_slim.checkpoints import save_checkpoint
from resnet_slim.compress.channel_removal import prune_channels
from resnet_slim.compress.depth import (
    block_removal_costs,
    mean_loss,
    removable_blocks,
    remove_blocks,
)
from resnet_slim.errors import UserError
from resnet_slim.train import model_bounds as bounds
from resnet_slim.train.architectures import shortcut_convs
from resnet_slim.train.models import build_model, channel_record, load_model, make_arch
from tests.conftest import random_bn_statistics, write_checkpoint

CIFAR = make_arch(name="cifar_resnet", depth=20, num_classes=10, width=4)
RESNET18 = make_arch(name="resnet18", num_classes=10, width=8, small_input=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like(arch: dict, seed: int = 0) -> nn.Module:
    """`build_model(arch)` in eval mode with random BN scales and statistics (not the init's)."""
    torch.manual_seed(seed)
    return random_bn_statistics(build_model(arch))


def data(n: int = 24, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=generator)
    return images, torch.randint(0, 10, (n,), generator=generator)


def assert_rebuilds_exactly(model: nn.Module, record: dict) -> None:
    """`build_model(record)` + the model's weights is the same network: same outputs."""
    rebuilt = build_model(record)
    rebuilt.load_state_dict(model.state_dict())
    images, _ = data(4)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), model.eval()(images))


def assert_one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    text = str(err.value)
    assert "\n" not in text and len(text) < 400, text
    for word in words:
        assert word in text, text


def test_removable_blocks_keep_every_shape_and_a_block_per_stage():
    assert removable_blocks(build_model(CIFAR)) == [
        "layer1.0",  # no shortcut in the first stage: the builder makes the same block
        "layer1.1",
        "layer1.2",
        "layer2.1",
        "layer2.2",
        "layer3.1",
        "layer3.2",
    ]
    assert removable_blocks(build_model(RESNET18)) == [
        "layer1.0",
        "layer1.1",
        "layer2.1",
        "layer3.1",
        "layer4.1",
    ]
    resnet50 = build_model(make_arch(name="resnet50", num_classes=10, width=8))
    assert "layer1.0" not in removable_blocks(resnet50)  # its shortcut widens 8 -> 32 channels
    assert removable_blocks(build_model({**CIFAR, "blocks": [1, 2, 1]})) == ["layer2.1"]


def test_bypassing_a_block_whose_residual_is_zero_costs_exactly_nothing():
    model = trained_like(CIFAR)
    with torch.no_grad():  # bn2 of layer2.1 outputs 0: relu(x + 0) = x, as x >= 0 (a ReLU's)
        model.layer2[1].bn2.weight.zero_()
        model.layer2[1].bn2.bias.zero_()
    model.train()
    model.layer1.eval()  # mixed modes must come back as they were
    before = copy.deepcopy(model.state_dict())
    blocks = {name: model.get_submodule(name) for name in removable_blocks(model)}
    images, labels = data()
    costs = block_removal_costs(model, images, labels, batch_size=10)
    assert list(costs) == list(blocks)
    assert costs["layer2.1"] == 0.0
    assert all(cost != 0.0 for name, cost in costs.items() if name != "layer2.1")
    assert costs == block_removal_costs(model, images, labels, batch_size=10)  # deterministic
    assert costs == pytest.approx(block_removal_costs(model, images, labels), abs=1e-5)
    # the model is left as it was: same weights and BN statistics, same blocks, same modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(model.get_submodule(name) is block for name, block in blocks.items())
    assert model.training and not model.layer1.training and model.layer2.training


def test_a_cost_is_the_loss_increase_of_the_model_without_that_block():
    model = trained_like(RESNET18)
    images, labels = data()
    base = mean_loss(model, images, labels)
    costs = block_removal_costs(model, images, labels)
    for name in ("layer1.0", "layer3.1"):
        without, _ = remove_blocks(model, RESNET18, [name])
        assert mean_loss(without, images, labels) - base == pytest.approx(costs[name], abs=1e-6)


def test_removing_blocks_keeps_the_survivors_weights_and_rebuilds_exactly():
    model = trained_like(CIFAR)
    before = copy.deepcopy(model.state_dict())
    pruned, record = remove_blocks(model, CIFAR, ["layer1.0", "layer2.1", "layer3.2"])
    assert record["blocks"] == [2, 2, 2] and "blocks" not in CIFAR and record["depth"] == 20
    assert [len(pruned.layer1), len(pruned.layer2), len(pruned.layer3)] == [2, 2, 2]
    moved = {"layer1.0": "layer1.1", "layer1.1": "layer1.2", "layer2.1": "layer2.2"}
    moved.update({"layer2.0": "layer2.0", "layer3.0": "layer3.0", "layer3.1": "layer3.1"})
    state = pruned.state_dict()
    for new, old in moved.items():
        for key in [k for k in before if k.startswith(f"{old}.")]:
            assert torch.equal(state[new + key[len(old) :]], before[key]), key
    assert len(state) == len(before) - 3 * 12  # a BasicBlock: 2 conv weights, 2 BNs of 5 each
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert len(model.layer1) == 3
    assert not any(conv.weight.requires_grad for conv in shortcut_convs(pruned).values())
    assert_rebuilds_exactly(pruned, record)
    images, labels = data()
    pruned.train()(images).sum().backward()  # trainable as it is


def test_resnet18_loses_blocks_of_its_four_stages():
    model = trained_like(RESNET18)
    pruned, record = remove_blocks(model, RESNET18, ("layer1.0", "layer4.1"))
    assert record["blocks"] == [1, 2, 2, 1]
    assert torch.equal(pruned.layer1[0].conv1.weight, model.layer1[1].conv1.weight)
    assert_rebuilds_exactly(pruned, record)
    # and again from the shallower model and its record
    again, record = remove_blocks(pruned, record, "layer3.1")
    assert record["blocks"] == [1, 2, 1, 1]
    assert_rebuilds_exactly(again, record)


def test_the_record_round_trips_through_a_checkpoint(tmp_path):
    pruned, record = remove_blocks(trained_like(CIFAR), CIFAR, ["layer2.2", "layer1.1"])
    save_checkpoint(tmp_path / "m.pt", model=pruned, arch=record, params={}, metrics={})
    loaded, checkpoint = load_model(tmp_path / "m.pt", num_classes=10, image_size=8)
    assert checkpoint["arch"] == record
    images, _ = data(4)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), pruned(images))


def test_a_channel_pruned_model_loses_blocks_with_its_channel_record():
    model = trained_like(make_arch(name="cifar_resnet", depth=20, num_classes=10, width=8))
    slim = prune_channels(
        model,
        method="l1_filter",
        ratio=0.5,
        round_to=None,
        global_pruning=False,
        image_size=8,
        keep_residual_streams=True,
    )
    arch = {**make_arch(name="cifar_resnet", depth=20, num_classes=10, width=8)}
    arch["channels"] = channel_record(slim)
    pruned, record = remove_blocks(slim, arch, ["layer1.1", "layer3.1"])
    assert record["channels"] == channel_record(pruned)
    assert "layer1.2.conv1" not in record["channels"] and "layer3.2.bn1" not in record["channels"]
    assert not any(conv.weight.requires_grad for conv in shortcut_convs(pruned).values())
    assert_rebuilds_exactly(pruned, record)


def test_each_survivors_channel_entries_move_to_its_new_index():
    """Blocks of different inner widths: an entry left at its old index would not load."""
    channels = {}
    for index, inner in enumerate((2, 3, 5)):
        block = f"layer1.{index}"
        channels.update(
            {f"{block}.conv1": [inner, 4], f"{block}.bn1": [inner], f"{block}.conv2": [4, inner]}
        )
    arch = {**CIFAR, "channels": channels, "lowrank": {"layer1.2.conv2": 2, "linear": 3}}
    pruned, record = remove_blocks(trained_like(arch), arch, ["layer1.0"])
    assert record["channels"]["layer1.0.conv1"] == [3, 4]
    assert record["channels"]["layer1.1.bn1"] == [5]
    assert "layer1.2.conv1" not in record["channels"]
    assert record["lowrank"] == {"layer1.1.conv2": 2, "linear": 3}
    assert arch["channels"]["layer1.0.conv1"] == [2, 4]  # the caller's record is not modified
    assert_rebuilds_exactly(pruned, record)


@pytest.mark.parametrize(
    ("names", "words"),
    [
        (["layer2.0"], ["'layer2.0' cannot be removed", "stride or shortcut"]),
        (["layer4.0"], ["no residual block 'layer4.0'"]),
        (["layer1.3"], ["no residual block 'layer1.3'"]),
        (["conv1"], ["not a block name"]),
        (["layer1.0.conv1"], ["not a block name"]),
        ([3], ["not a block name"]),
        (["layer1.0\nlayer1.1"], ["not a block name"]),
        (["layer1.0", "layer1.1", "layer1.2"], ["layer1", "every stage keeps at least one"]),
    ],
)
def test_bad_block_names_are_one_line_errors(names, words):
    model = build_model(CIFAR)
    with pytest.raises(UserError) as err:
        remove_blocks(model, CIFAR, names)
    assert_one_line(err, *words)


def test_the_last_block_of_a_stage_stays():
    record = {**CIFAR, "blocks": [1, 1, 3]}
    with pytest.raises(UserError) as err:
        remove_blocks(build_model(record), record, ["layer1.0"])
    assert_one_line(err, "'layer1.0' cannot be removed: the only block of layer1")


def test_other_models_records_and_data_are_one_line_errors():
    model = build_model(CIFAR)
    images, labels = data()
    mobilenet = build_model(make_arch(name="mobilenet_v3_small", num_classes=10, width=16))
    cases = [
        lambda: removable_blocks(mobilenet),
        lambda: remove_blocks(model, RESNET18, ["layer1.1"]),  # another network's record
        lambda: remove_blocks(model, {**CIFAR, "blocks": [2, 3, 3]}, ["layer1.1"]),
        lambda: remove_blocks(model, None, ["layer1.1"]),
        lambda: block_removal_costs(model, images[0], labels),
        lambda: block_removal_costs(model, images, labels.float()),
        lambda: block_removal_costs(model, images, labels[:3]),
        lambda: block_removal_costs(model, images, labels, batch_size=0),
        lambda: block_removal_costs(model, images, labels + 10),
    ]
    for case in cases:
        with pytest.raises(UserError) as err:
            case()
        assert_one_line(err)


@pytest.mark.parametrize(
    ("arch", "blocks"),
    [
        (CIFAR, [3, 3]),
        (CIFAR, [3, 3, 3, 3]),
        (CIFAR, [0, 3, 3]),
        (CIFAR, [3, 4, 3]),  # more than cifar_resnet20 has
        (CIFAR, [3, 10**9, 3]),
        (CIFAR, ["3", 3, 3]),
        (CIFAR, [True, 3, 3]),
        (CIFAR, [2.0, 3, 3]),
        (CIFAR, "333"),
        (CIFAR, {0: 3}),
        (CIFAR, torch.tensor([3, 3, 3])),
        (RESNET18, [2, 2, 2]),
        (RESNET18, [2, 2, 2, -1]),
        (make_arch(name="mobilenet_v3_small", num_classes=10), [1, 1, 1]),
    ],
)
def test_bad_blocks_records_are_one_line_errors_before_building(arch, blocks, monkeypatch):
    from resnet_slim.train import models

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    for builder in ("ResNet", "CifarResNet", "MobileNetV3Small"):
        monkeypatch.setattr(models, builder, never)
    with pytest.raises(UserError) as err:
        build_model({**arch, "blocks": blocks})
    assert_one_line(err, "bad architecture record", "blocks")


def test_a_blocks_record_is_sized_as_built():
    for arch in (
        {**CIFAR, "blocks": [1, 3, 2]},
        {**RESNET18, "blocks": [torch.tensor(1), 2, 1, 2]},  # numbers as tensors read as numbers
        {**make_arch(name="resnet50", num_classes=10, width=8), "blocks": [1, 2, 6, 1]},
    ):
        model = build_model(arch)
        assert set(bounds._layer_table(arch)) == set(channel_record(model))
        params = sum(p.numel() for p in model.parameters())
        assert (
            bounds.arch_size(arch, 8)[0] == params < bounds.arch_size({**arch, "blocks": None})[0]
        )


def test_records_without_blocks_build_the_unchanged_model(tmp_path):
    for arch, own in ((CIFAR, [3, 3, 3]), (RESNET18, [2, 2, 2, 2])):
        models = []
        for record in (arch, {**arch, "blocks": None}, {**arch, "blocks": own}):
            torch.manual_seed(0)
            models.append(build_model(record).state_dict())
        assert list(models[0]) == list(models[1]) == list(models[2])
        assert all(torch.equal(models[0][k], other[k]) for other in models[1:] for k in models[0])
    model, checkpoint = load_model(write_checkpoint(tmp_path / "old.pt"))  # a record of before
    assert "blocks" not in checkpoint["arch"]
    assert list(model.state_dict()) == list(checkpoint["state_dict"])
