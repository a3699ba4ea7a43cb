import pytest
import torch

from resnet_slim.data import loader as data
from resnet_slim.data.loader import train_val_loaders
from resnet_slim.errors import UserError
from resnet_slim.params import Augment, TrainParams
from resnet_slim.train import engine
from resnet_slim.train.models import build_model, make_arch
from tests.conftest import tiny_arch


def test_fit_learns_and_logs_with_dvclive(tiny_prepared, tmp_path):
    engine.seed_everything(0, 2)
    # no translation: a 2 px shift is a quarter of these 8 px images and slows learning a lot
    p = TrainParams(epochs=6, lr=0.05, batch_size=16, warmup_epochs=0.5)
    train, val, meta = train_val_loaders(
        tiny_prepared, batch_size=16, augment=Augment(crop_padding=0), seed=0
    )
    model = build_model(make_arch(name="resnet18", num_classes=10, width=16))
    before = engine.evaluate(model, val)["top1"]
    history = engine.fit(
        model,
        train,
        val,
        p,
        loss_fn=engine.cross_entropy(),
        live_dir=tmp_path / "live",
        desc="test",
    )
    assert len(history) == 6
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_top1"] > max(before, 80.0)  # 10 classes: chance is 10%
    assert (tmp_path / "live" / "metrics.json").is_file()
    assert (tmp_path / "live" / "plots" / "metrics" / "val_top1.tsv").is_file()


def test_non_finite_loss_stops_with_epoch_and_step(tiny_prepared, tmp_path):
    train, val, _ = train_val_loaders(tiny_prepared, batch_size=32, augment=None, seed=0)
    model = build_model(make_arch(name="resnet18", num_classes=10, width=8))

    def exploding(model, images, targets):
        logits = model(images)
        return logits.sum() * float("nan"), logits

    with pytest.raises(UserError, match="epoch 1, step 1"):
        engine.fit(
            model,
            train,
            val,
            TrainParams(epochs=1),
            loss_fn=exploding,
            live_dir=tmp_path / "live",
            desc="test",
        )


def test_after_backward_hook_runs_between_backward_and_step(tiny_prepared):
    """On batch k the hook sees this batch's fresh gradients and exactly k-1 optimizer steps: it
    fails if the hook ran before backward (no gradient) or after step (k steps)."""
    train, _, _ = train_val_loaders(tiny_prepared, batch_size=64, augment=None, seed=0)
    model = build_model(make_arch(name="resnet18", num_classes=10, width=8))
    optimizer, _ = engine.make_optimizer(model, TrainParams(epochs=1), len(train))
    steps_taken = []
    optimizer.register_step_post_hook(lambda *_: steps_taken.append(1))
    seen = []  # (optimizer steps so far, gradient present) at each hook call
    engine.train_one_epoch(
        model,
        train,
        optimizer,
        engine.cross_entropy(),
        after_backward=lambda m: seen.append((len(steps_taken), m.fc.weight.grad is not None)),
    )
    assert seen == [(k, True) for k in range(len(train))]
    assert len(steps_taken) == len(train)


def test_warmup_then_cosine_schedule():
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = engine.make_optimizer(
        model, TrainParams(epochs=2, lr=1.0, warmup_epochs=1), 10
    )
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.05


def test_torchvision_layout_is_kept_for_the_standard_width():
    import torchvision

    ours = build_model(make_arch(name="resnet50", num_classes=1000, width=64, small_input=False))
    theirs = torchvision.models.resnet50()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


def test_training_on_an_empty_split_is_a_clear_error(tmp_path, tiny_prepared):
    meta = data.load_meta(tiny_prepared)
    empty = data.BatchLoader(
        torch.zeros(0, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(0, dtype=torch.long),
        meta=meta,
        batch_size=8,
    )
    val = data.BatchLoader(
        *[getattr(data.load_split(tiny_prepared, "val"), k) for k in ("images", "labels")],
        meta=meta,
        batch_size=64,
    )
    model = build_model(tiny_arch())
    with pytest.raises(UserError, match="teacher: the training split is empty"):
        engine.fit(
            model,
            empty,
            val,
            TrainParams(epochs=1),
            loss_fn=engine.cross_entropy(),
            live_dir=tmp_path / "live",
            desc="teacher",
        )
