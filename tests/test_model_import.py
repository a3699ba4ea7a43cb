"""Bring your own model: importing torchvision / CIFAR ResNet checkpoints, the option-A shortcut,
every stage on an imported teacher, input normalisation, and every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from resnet_slim.checkpoints import load_checkpoint
from resnet_slim.compress import prune
from resnet_slim.data import loader as data
from resnet_slim.data import pixels, prepare
from resnet_slim.errors import UserError
from resnet_slim.params import parse_params
from resnet_slim.train.architectures import CifarResNet, option_a_weight
from resnet_slim.train.model_import import import_model
from resnet_slim.train.models import build_model, channel_record, load_model, make_arch
from tests.conftest import REPO, write_params

SHARED = REPO.parent / "shared"
SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN scales and statistics, so a wrong mapping of any tensor shows in the
    logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def cifar_file(path: Path, *, depth: int = 20, num_classes: int = 10, seed: int = 0) -> Path:
    """A CIFAR ResNet saved as the public CIFAR checkpoints are: {"state_dict"}, `module.` keys,
    no shortcut keys (option A has no parameters)."""
    torch.manual_seed(seed)
    model = randomize_bn(
        build_model(make_arch(name="cifar_resnet", depth=depth, num_classes=num_classes, width=16)),
        seed,
    )
    state = {f"module.{k}": v for k, v in model.state_dict().items() if ".downsample." not in k}
    torch.save({"state_dict": state, "best_prec1": 91.7}, path)
    return path


# ---------------------------------------------------------------- formats and families


@pytest.mark.parametrize("stem", ["imagenet", "small_input"])
def test_torchvision_resnet18_imports_with_torchvisions_own_logits(tmp_path, stem):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=7)
    if stem == "small_input":  # the common CIFAR variant: 3x3/1 stem, no max-pool
        reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        reference.maxpool = nn.Identity()
    randomize_bn(reference)
    state = reference.state_dict()
    if stem == "small_input":  # DataParallel prefix and wrapper: both accepted
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(state, tmp_path / "tv.pth")
    model, arch, origin = import_model(tmp_path / "tv.pth", "torchvision", num_classes=7)
    assert arch["name"] == "resnet18" and arch["width"] == 64
    assert arch["small_input"] == (stem == "small_input")
    assert origin["format"] == "torchvision" and len(origin["sha256"]) == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "arch",
    [
        make_arch(name="resnet34", num_classes=5, width=8, small_input=True),
        make_arch(name="resnet50", num_classes=5, width=8, small_input=False),
        make_arch(name="cifar_resnet", depth=32, num_classes=5, width=16),
    ],
)
def test_auto_format_finds_family_depth_width_and_stem(tmp_path, arch):
    torch.manual_seed(0)
    source = randomize_bn(build_model(arch))
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "m.pt")
    model, found, origin = import_model(tmp_path / "m.pt", "auto", num_classes=5)
    assert found == arch
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x), rtol=0, atol=0)


def test_project_checkpoint_imports_as_resnet_slim(tmp_path):
    from resnet_slim.checkpoints import save_checkpoint

    arch = make_arch(name="cifar_resnet", depth=20, num_classes=4, width=8)
    model = randomize_bn(build_model(arch))
    save_checkpoint(tmp_path / "own.pt", model=model, arch=arch, params={}, metrics={})
    imported, found, origin = import_model(tmp_path / "own.pt", "auto", num_classes=4)
    assert found == arch and origin["format"] == "resnet_slim"
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(imported.eval()(x), model(x), rtol=0, atol=0)


@pytest.mark.skipif(
    not (SHARED / "models" / "resnet20-12fca82f.th").is_file(),
    reason="../shared/models/resnet20-12fca82f.th is absent (shared data not mounted)",
)
def test_shared_cifar_resnet20_scores_on_500_cifar10_test_images():
    model, arch, origin = import_model(
        SHARED / "models" / "resnet20-12fca82f.th", "cifar_resnet", num_classes=10
    )
    assert arch["depth"] == 20 and origin["sha256"].startswith("12fca82f")
    root = SHARED / "datasets" / "cifar10" / "test"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())  # the model's class order
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.jpg"))[:50]:
            with data.Image.open(file) as image:
                images.append(pixels.to_rgb_array(image, 32))
            labels.append(label)
    meta = prepare.normalization_stats("imagenet", np.stack(images))  # ImageNet mean/std on [0, 1]
    x = data.normalize(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), meta)
    with torch.no_grad():
        top1 = 100.0 * (model.eval()(x).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert len(labels) == 500 and top1 >= 75.0, top1  # measured 79.6 %


# ---------------------------------------------------------------- option-A shortcut


def test_option_a_conv_equals_subsample_and_zero_pad():
    x = torch.relu(torch.randn(3, 16, 9, 9))  # odd size too: both give ceil(9 / 2) = 5 pixels
    model = CifarResNet(depth=20, num_classes=10, width=16)
    shortcut = model.layer2[0].downsample
    expected = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))  # C/2 zeros each side
    torch.testing.assert_close(shortcut(x), expected, rtol=0, atol=0)
    assert not shortcut[0].weight.requires_grad
    assert torch.equal(
        option_a_weight(2)[:, :, 0, 0],
        torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
    )


def test_pruning_through_the_option_a_shortcut_is_exact():
    torch.manual_seed(0)
    model = randomize_bn(
        build_model(make_arch(name="cifar_resnet", depth=20, num_classes=10, width=16))
    )
    # Residual-stream channels (every BN feeding that stream: the stem's bn1 for layer1, each
    # block's bn2) with γ = β = 0 carry exactly 0. Stream channels chosen so that the shortcut
    # loses inputs (layer1: 2, 11) and outputs (layer2: 10 <- 2, 19 <- 11; 0 and 30 are padding;
    # layer3: 26 <- 10, 63 padding), plus channels inside blocks.
    streams = {"layer1": [2, 11], "layer2": [0, 10, 19, 30], "layer3": [1, 26, 63]}
    internal = {"layer1.0.bn1": [0, 5], "layer2.1.bn1": [3], "layer3.2.bn1": [7, 9]}
    bns = {
        name: channels
        for layer, channels in streams.items()
        for name in [f"{layer}.{i}.bn2" for i in range(3)] + (["bn1"] if layer == "layer1" else [])
    }
    with torch.no_grad():
        for name, channels in {**bns, **internal}.items():
            model.get_submodule(name).weight[channels] = 0.0
            model.get_submodule(name).bias[channels] = 0.0
    removed = sum(map(len, streams.values())) + sum(map(len, internal.values()))
    prunable = 3 * (16 + 32 + 64) + (16 + 32 + 64)  # block conv1 outputs + the three streams
    pruned = prune.prune_channels(
        model,
        method="bn_slimming",
        ratio=(removed - 0.5) / prunable,
        round_to=None,
        global_pruning=True,
        image_size=SIZE,
    )
    shortcut = pruned.layer2[0].downsample[0]
    assert list(shortcut.weight.shape[:2]) == [28, 14] and not shortcut.weight.requires_grad
    assert pruned.layer3[0].downsample[0].out_channels == 61 and pruned.linear.out_features == 10
    x = torch.randn(8, 3, SIZE, SIZE)
    with torch.no_grad():  # measured max |diff|: 7e-7
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)
        # and the checkpoint route (channel record -> build_model -> load) rebuilds it exactly
        arch = {
            **make_arch(name="cifar_resnet", depth=20, num_classes=10, width=16),
            "channels": channel_record(pruned),
        }
        rebuilt = build_model(arch)
        rebuilt.load_state_dict(pruned.state_dict())
        torch.testing.assert_close(rebuilt.eval()(x), pruned(x), rtol=0, atol=0)
    assert not rebuilt.layer2[0].downsample[0].weight.requires_grad


# ---------------------------------------------------------------- bad input


def test_missing_file_unknown_format_and_refused_pickle(tmp_path):
    with pytest.raises(UserError, match="model file not found"):
        import_model(tmp_path / "nope.th", num_classes=10)
    cifar_file(tmp_path / "c.th")
    with pytest.raises(UserError, match=r"teacher.format 'keras' is unknown; choose one of"):
        import_model(tmp_path / "c.th", "keras", num_classes=10)
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # a pickled module: code, not weights
    with pytest.raises(UserError, match=r"refused by the safe loader, weights_only=True"):
        import_model(tmp_path / "pickled.pt", num_classes=10)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a state dict"):
        import_model(tmp_path / "list.pt", num_classes=10)
    with pytest.raises(UserError, match="not a resnet_slim checkpoint"):
        import_model(tmp_path / "c.th", "resnet_slim", num_classes=10)


def test_keys_matching_no_family_name_the_closest_and_the_keys(tmp_path):
    state = build_model(make_arch(name="resnet18", num_classes=10, width=8)).state_dict()
    del state["layer4.1.conv2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(UserError) as err:
        import_model(tmp_path / "odd.pt", num_classes=10)
    message = str(err.value)
    assert "closest is resnet18" in message and "['extra.weight']" in message
    assert "['layer4.1.conv2.weight']" in message and "\n" not in message
    with pytest.raises(
        UserError, match="no model of the cifar_resnet format; closest is cifar_resnet"
    ):
        import_model(tmp_path / "odd.pt", "cifar_resnet", num_classes=10)


def test_shape_mismatch_and_bad_stem_are_named(tmp_path):
    state = torch.load(cifar_file(tmp_path / "c.th"), weights_only=True)["state_dict"]
    state["module.layer1.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    torch.save(state, tmp_path / "shape.th")
    with pytest.raises(
        UserError,
        match=r"layer1.0.conv1.weight has shape \[16, 16, 5, 5\] in the "
        r"file but \[16, 16, 3, 3\] in cifar_resnet20",
    ):
        import_model(tmp_path / "shape.th", num_classes=10)
    tv = build_model(make_arch(name="resnet18", num_classes=10, width=8)).state_dict()
    tv["conv1.weight"] = torch.zeros(8, 3, 5, 5)
    torch.save(tv, tmp_path / "stem.pt")
    with pytest.raises(UserError, match="conv1 is 5x5; expected the ImageNet 7x7 stem"):
        import_model(tmp_path / "stem.pt", num_classes=10)


def test_class_count_mismatch_needs_replace_head(tmp_path):
    cifar_file(tmp_path / "c.th", num_classes=10)
    with pytest.raises(
        UserError, match="predicts 10 classes but the data has 3; set teacher.replace_head: true"
    ):
        import_model(tmp_path / "c.th", num_classes=3)
    original, _, _ = import_model(tmp_path / "c.th", num_classes=10)
    model, arch, origin = import_model(tmp_path / "c.th", num_classes=3, replace_head=True)
    assert arch["num_classes"] == 3 and model.linear.out_features == 3
    assert origin["head_replaced"] and origin["classes_in_file"] == 10
    assert torch.equal(model.layer3[2].conv2.weight, original.layer3[2].conv2.weight)  # body kept
    same_count, _, origin = import_model(tmp_path / "c.th", num_classes=10, replace_head=True)
    assert origin["head_replaced"]  # another label set of the same size: a fresh head too
    assert not torch.equal(same_count.linear.weight, original.linear.weight)


def test_params_for_imports_and_normalisation():
    raw = __import__("yaml").safe_load((REPO / "params.yaml").read_text())

    def parse(section, **values):
        return parse_params({**raw, section: {**raw[section], **values}})

    with pytest.raises(UserError, match="teacher.epochs: .*needs teacher.init"):
        parse("teacher", epochs=0)
    assert parse("teacher", epochs=0, init="m.th").teacher.init == "m.th"
    with pytest.raises(UserError, match="teacher.format"):
        parse("teacher", format="keras")
    assert parse("prepare", normalize="imagenet").prepare.normalize == "imagenet"
    with pytest.raises(UserError, match="prepare.normalize"):
        parse("prepare", normalize={"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]})
    with pytest.raises(UserError, match="prepare.normalize"):
        parse("prepare", normalize={"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]})


def test_prepared_meta_carries_the_chosen_normalisation(tmp_path):
    raw = prepare.subsample_per_class(prepare.load_digits(8), 10, seed=0)
    split = prepare.stratified_split(raw.labels, val_fraction=0.2, test_fraction=0.2, seed=0)
    prepare.write_prepared(tmp_path / "imagenet", raw, split, extra_meta={}, normalize="imagenet")
    meta = data.load_meta(tmp_path / "imagenet")
    assert meta["mean"] == prepare.IMAGENET_MEAN and meta["std"] == prepare.IMAGENET_STD
    assert meta["normalization"] == "imagenet"
    custom = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.25]}
    prepare.write_prepared(tmp_path / "custom", raw, split, extra_meta={}, normalize=custom)
    meta = data.load_meta(tmp_path / "custom")
    pixel = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)  # 1.0 on [0, 1]
    expected = torch.tensor([1.8, 1.6, 2.8]).view(1, 3, 1, 1)
    torch.testing.assert_close(data.normalize(pixel, meta), expected)
    with pytest.raises(UserError, match="prepare.normalize must be"):
        prepare.normalization_stats({"mean": [0, 0, 0], "std": [1, -1, 1]}, raw.images)


def test_prepare_stage_writes_the_configured_statistics(tmp_path):
    from stages.prepare import main

    params = write_params(
        tmp_path / "params.yaml",
        prepare={
            "image_size": 8,
            "max_images_per_class": 10,
            "val_fraction": 0.2,
            "test_fraction": 0.2,
            "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        },
    )
    main(["--params", str(params), "--out", str(tmp_path / "prepared")])
    meta = data.load_meta(tmp_path / "prepared")
    assert meta["mean"] == [0.5] * 3 and meta["std"] == [0.25] * 3
    assert meta["normalization"] == "custom"


# ---------------------------------------------------------------- stages on an imported teacher

TINY = {"epochs": 1, "batch_size": 64, "lr": 0.02, "warmup_epochs": 0}


def stage_params(tmp_path: Path, teacher_file: Path, **overrides) -> Path:
    sections = {
        "base": {"threads": 1},
        "teacher": {"init": str(teacher_file), "format": "auto", "epochs": 0},
        "prune": {"ratio": 0.3, "round_to": 4, "sparsity": TINY, "finetune": TINY},
        "lowrank": {"finetune": TINY},
        # a 1-epoch model near chance has near-tied logits: INT8 rounding flips a few of its 80
        # test images (3 seen on a VNNI host), where a trained model agrees on >= 97 %
        "qat": {
            **TINY,
            "freeze_bn_epoch": 0,
            "freeze_observer_epoch": 1,
            "calibration_images": 64,
            "min_agreement": 0.9,
        },
        "distill": {"epochs": 1, "feature_stages": [3], "feature_weight": 0.5},
    }
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    return write_params(tmp_path / "params.yaml", **sections)


@pytest.mark.parametrize("epochs", [0, 1])
def test_train_teacher_imports_evaluates_and_adapts(tmp_path, tiny_prepared, epochs):
    from stages.train_teacher import main

    cifar_file(tmp_path / "c.th", num_classes=2)
    params = stage_params(
        tmp_path, tmp_path / "c.th", teacher={"epochs": epochs, "replace_head": True, "lr": 0.01}
    )
    main(
        [
            "--params",
            str(params),
            "--data",
            str(tiny_prepared),
            "--out",
            str(tmp_path / "t.pt"),
            "--live",
            str(tmp_path / "live"),
        ]
    )
    summary = json.loads((tmp_path / "live" / "summary.json").read_text())
    origin = summary["origin"]
    assert origin["file"] == str(tmp_path / "c.th") and origin["format"] == "cifar_resnet"
    assert origin["family"] == "cifar_resnet20" and origin["head_replaced"]
    assert set(origin["top1_as_imported"]) == {"val", "test"}
    checkpoint = load_checkpoint(tmp_path / "t.pt")
    assert (
        checkpoint["metrics"] == {k: v for k, v in summary.items() if k != "outputs"}
        and checkpoint["arch"]["name"] == "cifar_resnet"
    )
    assert summary["epochs"] == epochs and len(summary["val_top1_curve"]) == epochs
    teacher, _ = load_model(tmp_path / "t.pt", num_classes=10)
    file_weights = torch.load(tmp_path / "c.th", weights_only=True)["state_dict"]
    body_unchanged = torch.equal(
        teacher.layer1[0].conv1.weight, file_weights["module.layer1.0.conv1.weight"]
    )
    if epochs == 0:  # used as is (the new head is the only change)
        assert origin["top1_after_adaptation"] is None and body_unchanged
        assert summary["val_top1"] == origin["top1_as_imported"]["val"]
    else:
        assert set(origin["top1_after_adaptation"]) == {"val", "test"} and not body_unchanged
    assert torch.equal(teacher.layer2[0].downsample[0].weight, option_a_weight(16))  # never trained


def test_every_stage_runs_on_an_imported_cifar_teacher(tmp_path, tiny_prepared, capsys):
    from stages import (
        cache_teacher,
        distill_student,
        export,
        lowrank,
        qat,
        slim_prune,
        train_teacher,
    )

    cifar_file(tmp_path / "c.th", num_classes=10)
    cifar_file(tmp_path / "student.th", num_classes=2, seed=1)
    params = stage_params(
        tmp_path,
        tmp_path / "c.th",
        distill={
            "student": {
                "init": str(tmp_path / "student.th"),
                "format": "cifar_resnet",
                "replace_head": True,
            }
        },
    )
    common = ["--params", str(params), "--data", str(tiny_prepared)]
    t = str(tmp_path / "teacher.pt")
    train_teacher.main(common + ["--out", t, "--live", str(tmp_path / "rt")])
    slim_prune.main(
        common
        + ["--teacher", t, "--out", str(tmp_path / "pruned.pt"), "--reports", str(tmp_path / "rp")]
    )
    pruned, checkpoint = load_model(tmp_path / "pruned.pt")
    assert checkpoint["metrics"]["params"]["ratio"] < 1.0
    shortcut = pruned.layer3[0].downsample[0].weight
    assert set(shortcut.unique().tolist()) <= {0.0, 1.0} and not shortcut.requires_grad  # fixed
    lowrank.main(
        common
        + [
            "--teacher",
            t,
            "--pruned",
            str(tmp_path / "pruned.pt"),
            "--out",
            str(tmp_path / "lowrank.pt"),
            "--reports",
            str(tmp_path / "rl"),
        ]
    )
    ranks = load_checkpoint(tmp_path / "lowrank.pt")["arch"]["lowrank"]
    assert ranks and not any("downsample" in name for name in ranks)  # the shortcut stays exact
    qat.main(
        common
        + [
            "--checkpoint",
            str(tmp_path / "pruned.pt"),
            "--onnx",
            str(tmp_path / "q.onnx"),
            "--out",
            str(tmp_path / "q.pt"),
            "--reports",
            str(tmp_path / "rq"),
        ]
    )
    kernels = json.loads((tmp_path / "rq" / "metrics.json").read_text())["kernels"]
    assert kernels["all_convs_int8"] and kernels["int8_convs"] == 21  # 19 convs + 2 shortcuts
    cache_teacher.main(common + ["--teacher", t, "--out", str(tmp_path / "cache.pt")])
    distill_student.main(
        common
        + [
            "--teacher",
            t,
            "--cache",
            str(tmp_path / "cache.pt"),
            "--out",
            str(tmp_path / "s.pt"),
            "--reports",
            str(tmp_path / "rd"),
        ]
    )
    metrics = json.loads((tmp_path / "rd" / "metrics.json").read_text())
    assert metrics["student_origin"]["family"] == "cifar_resnet20"
    assert {"student_top1_kd", "student_top1_no_kd"} <= set(metrics)
    low, high = metrics["kd_gain_ci_pp"]  # paired over the same test images
    assert low <= metrics["kd_gain_pp"] <= high and 0.0 <= metrics["kd_mcnemar_p"] <= 1.0
    assert "larger than the teacher" not in capsys.readouterr().err
    export.main(common + [t, str(tmp_path / "t.onnx"), "--report", str(tmp_path / "ex.json")])
    assert json.loads((tmp_path / "ex.json").read_text())["passed"]

    # a 3-stage teacher has no layer4 to match; a bigger student is allowed with a warning
    params = stage_params(tmp_path, tmp_path / "c.th", distill={"feature_stages": [4]})
    with pytest.raises(UserError, match=r"distill.feature_stages \[4\]: the teacher has 3 stages"):
        cache_teacher.main(
            [
                "--params",
                str(params),
                "--data",
                str(tiny_prepared),
                "--teacher",
                t,
                "--out",
                str(tmp_path / "cache4.pt"),
            ]
        )
    assert not (tmp_path / "cache4.pt").exists()
    params = stage_params(
        tmp_path,
        tmp_path / "c.th",
        distill={
            "feature_weight": 0.0,
            "train_baseline": False,
            "student": {"arch": "resnet18", "width": 16},
        },
    )
    distill_student.main(
        [
            "--params",
            str(params),
            "--data",
            str(tiny_prepared),
            "--teacher",
            t,
            "--cache",
            str(tmp_path / "cache.pt"),
            "--out",
            str(tmp_path / "s2.pt"),
            "--reports",
            str(tmp_path / "rd2"),
        ]
    )
    assert "warning: the student" in capsys.readouterr().err


def test_stage_bad_init_is_one_error_line_and_writes_nothing(tmp_path, tiny_prepared):
    params = stage_params(tmp_path, tmp_path / "missing.th")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.train_teacher",
            "--params",
            str(params),
            "--data",
            str(tiny_prepared),
            "--out",
            str(tmp_path / "t.pt"),
            "--live",
            str(tmp_path / "live"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.th'}: model file not found"
    ]
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "live").exists()


@pytest.mark.parametrize(
    "claim",
    [{"width": 200_000}, {"num_classes": 10**9}, {"channels": {"conv1": [10**7, 3]}}, {"width": 0}],
)
def test_a_checkpoint_claiming_huge_sizes_is_refused_before_allocation(claim):
    arch = {**make_arch(name="resnet18", num_classes=10, width=8), **claim}
    with pytest.raises(UserError, match="outside 1.."):
        build_model(arch)
