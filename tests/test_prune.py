"""Pruning: physical channel removal (network slimming, L1 filters), magnitude sparsity, the
stage."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from resnet_slim.checkpoints import load_checkpoint, save_checkpoint
from resnet_slim.compress import prune
from resnet_slim.compress.export import count_macs_params, export_onnx, make_session, run_onnx
from resnet_slim.data.loader import BatchLoader
from resnet_slim.errors import UserError
from resnet_slim.params import TrainParams
from resnet_slim.train import engine
from resnet_slim.train.engine import kd_logit_loss
from resnet_slim.train.models import build_model, channel_record, make_arch
from tests.conftest import random_bn_statistics, write_params

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str = "resnet18", seed: int = 0) -> nn.Module:
    """A width-8 ResNet in eval mode with random BN statistics and scales (not the init's 1/0)."""
    torch.manual_seed(seed)
    return random_bn_statistics(build_model(make_arch(name=name, num_classes=10, width=8)))


def conv_out_channels(model: nn.Module) -> dict[str, int]:
    return {
        row["layer"]: row["after"]
        for row in prune.kept_channels(channel_record(model), channel_record(model))
    }


def rebuild(model: nn.Module, name: str) -> nn.Module:
    arch = {**make_arch(name=name, num_classes=10, width=8), "channels": channel_record(model)}
    rebuilt = build_model(arch)
    rebuilt.load_state_dict(model.state_dict())  # strict: every key and shape must match
    return rebuilt.eval()


@pytest.mark.parametrize(
    "name, method, global_pruning",
    [
        ("resnet18", "bn_slimming", True),
        ("resnet34", "l1_filter", False),
        ("resnet50", "bn_slimming", True),
        ("resnet50", "l1_filter", True),
    ],
)
def test_channel_removal_shrinks_the_model_and_keeps_it_valid(name, method, global_pruning):
    model = tiny(name)
    before = channel_record(model)
    pruned = prune.prune_channels(
        model,
        method=method,
        ratio=0.4,
        round_to=None,
        global_pruning=global_pruning,
        image_size=SIZE,
    )
    assert channel_record(model) == before  # the input model is left alone
    macs, params = count_macs_params(model, SIZE)
    pruned_macs, pruned_params = count_macs_params(pruned, SIZE)
    assert pruned_params < 0.8 * params and pruned_macs < 0.8 * macs
    assert pruned.fc.out_features == 10  # classes are never pruned
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        out = pruned(x)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        # the checkpoint path: channel record -> build_model -> load_state_dict -> same function
        torch.testing.assert_close(rebuild(pruned, name)(x), out, rtol=0, atol=0)


def test_zero_gamma_channels_are_removed_without_changing_the_output():
    model = tiny("resnet18")
    # Channels inside blocks (conv1 -> bn1 -> relu -> conv2) with γ = β = 0 output exactly 0
    # whatever conv1 computes, so removing them from conv1, bn1 and conv2 is lossless.
    zeroed = {"layer1.0": [0, 5], "layer2.1": [3, 4, 9], "layer3.0": [2], "layer4.1": [0, 1, 7, 60]}
    with torch.no_grad():
        for block, channels in zeroed.items():
            bn = model.get_submodule(f"{block}.bn1")
            bn.weight[channels] = 0.0
            bn.bias[channels] = 0.0
            model.get_submodule(f"{block}.conv1").weight[channels] *= 10.0  # arbitrary, large
    k = sum(len(c) for c in zeroed.values())
    # Global ranking over all 360 prunable channels of a width-8 resnet18 (internal: 2·(8+16+32+64)
    # block conv1 channels; residual: 8+16+32+64 channels tied through the adds). Every other |γ|
    # is ≥ 0.5, so a ratio removing k channels puts the threshold at 0: exactly the zeroed ones.
    # (Per-layer pruning could not do this: it removes a share of every layer, residual ones too.)
    ratio = (k - 0.5) / 360
    pruned = prune.prune_channels(
        model,
        method="bn_slimming",
        ratio=ratio,
        round_to=None,
        global_pruning=True,
        image_size=SIZE,
    )
    expected = conv_out_channels(model)
    for block, channels in zeroed.items():
        expected[f"{block}.conv1"] -= len(channels)
    assert conv_out_channels(pruned) == expected
    x = torch.randn(8, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet"])
def test_keep_residual_streams_prunes_only_inside_blocks(name):
    torch.manual_seed(0)
    extra = {"depth": 20} if name == "cifar_resnet" else {}
    model = build_model(make_arch(name=name, num_classes=10, width=16, **extra)).eval()
    # The streams' γ are made the smallest, so a plain global rank would cut them first.
    inside = {n for n, _ in model.named_modules() if n.endswith(".bn1") and n.count(".") == 2}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and module_name in inside:
            module.weight.data.uniform_(0.5, 1.5)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.data.fill_(0.01)
    before = conv_out_channels(model)
    kwargs = dict(method="bn_slimming", ratio=0.5, round_to=None, global_pruning=True)
    kept = prune.prune_channels(model, **kwargs, image_size=SIZE, keep_residual_streams=True)
    plain = prune.prune_channels(model, **kwargs, image_size=SIZE)
    after = conv_out_channels(kept)
    changed = {layer for layer in before if after[layer] != before[layer]}
    assert changed and all(layer.endswith(".conv1") and layer != "conv1" for layer in changed)
    assert sum(before[layer] - after[layer] for layer in changed) == pytest.approx(
        0.5 * sum(before[layer.replace("bn1", "conv1")] for layer in inside), abs=len(inside)
    )
    assert conv_out_channels(plain)["conv1"] < before["conv1"]  # without the flag: stream cut
    with torch.no_grad():
        assert kept(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)


@pytest.mark.parametrize("global_pruning", [True, False])
def test_round_to_is_honoured(global_pruning):
    model = tiny("resnet18")
    pruned = prune.prune_channels(
        model,
        method="bn_slimming",
        ratio=0.5,
        round_to=16,
        global_pruning=global_pruning,
        image_size=SIZE,
    )
    before, after = conv_out_channels(model), conv_out_channels(pruned)
    assert after != before
    for layer, n in after.items():
        if before[layer] < 16:
            assert n == before[layer], layer  # fewer than round_to: left whole, never emptied
        else:
            assert n % 16 == 0 and n > 0, (layer, n)


def test_global_pruning_never_empties_a_layer():
    model = tiny("resnet18")
    with torch.no_grad():
        model.layer3[0].bn1.weight.fill_(1e-3)  # the whole layer is below any global threshold
    pruned = prune.prune_channels(
        model, method="bn_slimming", ratio=0.2, round_to=None, global_pruning=True, image_size=SIZE
    )
    assert pruned.layer3[0].conv1.out_channels == 1  # removed down to one, not skipped or emptied


def test_global_pruning_breaks_ties_instead_of_removing_every_tied_channel():
    torch.manual_seed(0)
    model = build_model(make_arch(name="resnet18", num_classes=10, width=8)).eval()  # every γ = 1
    pruned = prune.prune_channels(
        model, method="bn_slimming", ratio=0.3, round_to=None, global_pruning=True, image_size=SIZE
    )
    params, pruned_params = (count_macs_params(model, SIZE)[1], count_macs_params(pruned, SIZE)[1])
    assert 0.3 < pruned_params / params < 0.9


def test_pruned_checkpoint_reloads_and_exports_to_onnx_with_parity(tmp_path):
    model = tiny("resnet50")
    pruned = prune.prune_channels(
        model, method="bn_slimming", ratio=0.3, round_to=4, global_pruning=True, image_size=SIZE
    )
    arch = {
        **make_arch(name="resnet50", num_classes=10, width=8),
        "channels": channel_record(pruned),
    }
    save_checkpoint(tmp_path / "p.pt", model=pruned, arch=arch, params={}, metrics={})
    checkpoint = load_checkpoint(tmp_path / "p.pt")
    reloaded = build_model(checkpoint["arch"])
    reloaded.load_state_dict(checkpoint["state_dict"])
    export_onnx(reloaded, tmp_path / "p.onnx", image_size=SIZE, opset=17)
    x = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = pruned(x).numpy()
    np.testing.assert_allclose(run_onnx(make_session(tmp_path / "p.onnx"), x), expected, atol=1e-4)


def test_magnitude_pruning_gives_the_requested_sparsity_and_keeps_shapes():
    model = tiny("resnet18")
    pruned = prune.prune_unstructured(model, ratio=0.6)
    assert channel_record(pruned) == channel_record(model)
    assert pruned.state_dict().keys() == model.state_dict().keys()  # mask baked in, no weight_orig
    weights = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * total)
    assert prune.count_nonzero(pruned) == prune.count_nonzero(model) - zeros
    assert count_macs_params(pruned, SIZE) == count_macs_params(model, SIZE)


def test_keep_zeros_hook_preserves_sparsity_through_training():
    model = prune.prune_unstructured(tiny("resnet18"), ratio=0.5)
    zero_before = {n: (p == 0) for n, p in model.named_parameters() if p.ndim > 1}
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    loader = BatchLoader(
        torch.randint(0, 256, (32, SIZE, SIZE, 3), dtype=torch.uint8).numpy(),
        torch.randint(0, 10, (32,)),
        meta={"mean": [0.5] * 3, "std": [0.25] * 3},
        batch_size=16,
    )
    optimizer, _ = engine.make_optimizer(
        model, TrainParams(epochs=1, lr=0.1, warmup_epochs=0), len(loader)
    )
    engine.train_one_epoch(
        model,
        loader,
        optimizer,
        engine.cross_entropy(),
        after_backward=prune.keep_zeros_hook(model),
    )
    for name, param in model.named_parameters():
        if name in zero_before:
            assert (param[zero_before[name]] == 0).all(), name
    assert not torch.equal(model.fc.weight, snapshot["fc.weight"])  # it did train


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 1.0}, r"prune.ratio must be in \[0, 1\).*got 1.0"),
        ({"ratio": -0.1}, r"prune.ratio must be in \[0, 1\).*got -0.1"),
        ({"round_to": 0}, "round_to must be a positive integer"),
        ({"method": "magnitude"}, "does not remove channels"),
    ],
)
def test_bad_values_are_clear_user_errors(kwargs, message):
    args = {
        "method": "bn_slimming",
        "ratio": 0.3,
        "round_to": None,
        "global_pruning": True,
        "image_size": SIZE,
        **kwargs,
    }
    with pytest.raises(UserError, match=message):
        prune.prune_channels(tiny(), **args)
    if "ratio" in kwargs:
        with pytest.raises(UserError, match=r"prune.ratio must be in \[0, 1\)"):
            prune.prune_unstructured(tiny(), ratio=kwargs["ratio"])


def test_bn_l1_hook_adds_lambda_times_sign_gamma_to_bn_grads():
    model = tiny("resnet18")
    with torch.no_grad():
        model.bn1.weight[0] = 0.0  # sign(0) = 0: no push
        model.bn1.weight[1] = -0.7
    model.train()
    loss = model(torch.randn(4, 3, SIZE, SIZE)).square().mean()
    loss.backward()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    grads = [bn.weight.grad.clone() for bn in bns]
    conv_grad = model.conv1.weight.grad.clone()
    prune.bn_l1_hook(1e-2)(model)
    for bn, grad in zip(bns, grads, strict=True):
        torch.testing.assert_close(
            bn.weight.grad, grad + 1e-2 * torch.sign(bn.weight.detach()), rtol=0, atol=0
        )
    assert (
        model.bn1.weight.grad[0] == grads[0][0] and model.bn1.weight.grad[1] == grads[0][1] - 1e-2
    )
    assert torch.equal(model.conv1.weight.grad, conv_grad)  # only BN scales are penalised


def test_kd_finetune_loss_uses_a_frozen_teacher():
    teacher, student = tiny(seed=1), tiny(seed=2).train()
    teacher.train()  # the loss must switch it to eval (running statistics)
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, 10, (4,))
    loss, logits = prune.finetune_loss(teacher, kd_alpha=0.5, temperature=3.0)(student, x, y)
    loss.backward()
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        expected = kd_logit_loss(student(x), teacher(x), y, alpha=0.5, temperature=3.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    ce, _ = prune.finetune_loss(teacher, kd_alpha=0.0, temperature=3.0)(student, x, y)
    assert ce.item() == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_kept_channels_rows_and_plot(tmp_path):
    model = tiny("resnet18")
    pruned = prune.prune_channels(
        model, method="l1_filter", ratio=0.5, round_to=None, global_pruning=False, image_size=SIZE
    )
    rows = prune.kept_channels(channel_record(model), channel_record(pruned))
    assert {r["layer"] for r in rows} == {
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
    }
    assert all(0 < r["after"] <= r["before"] for r in rows)
    assert any(r["after"] < r["before"] for r in rows)
    prune.plot_kept_channels(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temp file left behind


@pytest.mark.parametrize("method", ["bn_slimming", "magnitude"])
def test_stage_prunes_fine_tunes_and_writes_a_reloadable_checkpoint(
    tmp_path, tiny_prepared, method
):
    from stages.slim_prune import main

    teacher_arch = make_arch(name="resnet18", num_classes=10, width=8)
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "teacher.pt",
        model=build_model(teacher_arch),
        arch=teacher_arch,
        params={},
        metrics={},
    )
    tiny_train = {"epochs": 1, "batch_size": 64, "lr": 0.02, "warmup_epochs": 0}
    params = write_params(
        tmp_path / "params.yaml",
        base={"threads": 1},
        teacher={"width": 8},
        prune={
            "method": method,
            "ratio": 0.4,
            "round_to": 4,
            "kd_alpha": 0.5,
            "sparsity": tiny_train,
            "finetune": tiny_train,
        },
    )
    reports = tmp_path / "reports"
    main(
        [
            "--params",
            str(params),
            "--teacher",
            str(tmp_path / "teacher.pt"),
            "--data",
            str(tiny_prepared),
            "--out",
            str(tmp_path / "pruned.pt"),
            "--reports",
            str(reports),
        ]
    )

    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics["top1_test"]) >= {"before", "after_removal", "after_finetune"}
    rows = json.loads((reports / "channels.json").read_text())
    assert (reports / "channels.png").stat().st_size > 0 and (reports / "finetune").is_dir()
    checkpoint = load_checkpoint(tmp_path / "pruned.pt")
    pruned = build_model(checkpoint["arch"])
    pruned.load_state_dict(checkpoint["state_dict"])
    teacher = build_model(teacher_arch)
    assert checkpoint["metrics"]["top1_test"] == metrics["top1_test"]
    if method == "bn_slimming":
        assert (reports / "sparsity").is_dir() and "after_sparsity" in metrics["top1_test"]
        assert count_macs_params(pruned, 8)[1] < count_macs_params(teacher, 8)[1]
        assert metrics["macs"]["ratio"] < 1.0 and metrics["params"]["ratio"] < 1.0
        assert all(r["after"] % 4 == 0 for r in rows)  # width 8: every layer is a multiple of 4
        assert {r["layer"]: r["after"] for r in rows} == conv_out_channels(pruned)
    else:  # same shapes, 40% of conv/linear weights zero, still zero after fine-tuning
        assert channel_record(pruned) == channel_record(teacher)
        assert metrics["params"]["ratio"] == 1.0
        weights = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        zeros = sum(int((w == 0).sum()) for w in weights)
        assert zeros == round(0.4 * sum(w.numel() for w in weights))
        assert metrics["nonzero_params"]["pruned"] == prune.count_nonzero(pruned)
