"""Model files: a checkpoint saves and reloads its architecture, and a missing, corrupt,
pickled or mismatched one is one clear error naming the file (resnet_slim/checkpoints.py and
train/models.load_model)."""

import os

import pytest
import torch

from resnet_slim.checkpoints import load_checkpoint, save_checkpoint
from resnet_slim.errors import UserError
from resnet_slim.train.models import build_model, channel_record, load_model, make_arch
from tests.conftest import tiny_arch, write_checkpoint


def test_checkpoint_round_trip_rebuilds_from_arch(tmp_path, tiny_model):
    arch = make_arch(name="resnet18", num_classes=10, width=8)
    save_checkpoint(
        tmp_path / "m.pt", model=tiny_model, arch=arch, params={"lr": 0.1}, metrics={"top1": 1.0}
    )
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    model = build_model(checkpoint["arch"])
    model.load_state_dict(checkpoint["state_dict"])
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), tiny_model(x))
    assert channel_record(model) == channel_record(tiny_model)


def test_checkpoint_whose_weights_do_not_match_its_arch_is_a_clear_error(tmp_path, tiny_model):
    wrong_arch = make_arch(name="resnet18", num_classes=10, width=16)
    save_checkpoint(tmp_path / "m.pt", model=tiny_model, arch=wrong_arch, params={}, metrics={})
    with pytest.raises(
        UserError, match="weights do not match the checkpoint's architecture record"
    ):
        load_model(tmp_path / "m.pt")


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {}, "arch": {}, "evil": object()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_checkpoint_missing_corrupt_or_pickled(tmp_path, tiny_model):
    with pytest.raises(UserError, match="none.pt: checkpoint not found"):
        load_model(tmp_path / "none.pt")
    (tmp_path / "random.pt").write_bytes(os.urandom(256))
    with pytest.raises(UserError, match="random.pt: not a loadable checkpoint"):
        load_model(tmp_path / "random.pt")
    torch.save(tiny_model, tmp_path / "pickled.pt")  # a whole module: needs arbitrary unpickling
    with pytest.raises(
        UserError,
        match="pickled.pt: not a loadable checkpoint .refused by the safe "
        "loader, weights_only=True: Unsupported global",
    ):
        load_model(tmp_path / "pickled.pt")
    torch.save({"weights": tiny_model.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="checkpoint lacks \\['arch', 'state_dict'\\]"):
        load_model(tmp_path / "plain.pt")


@pytest.mark.parametrize(
    "arch, message",
    [
        (
            {**tiny_arch(), "width": 16},
            "weights do not match the checkpoint's architecture record "
            "\\(size mismatch for conv1.weight",
        ),
        ({**tiny_arch(), "name": "resnet34"}, "weights do not match .*Missing key"),
        ({**tiny_arch(), "name": "vgg16"}, "bad architecture record .*KeyError: 'vgg16'"),
        ({**tiny_arch(), "channels": {"fc": [10]}}, "bad architecture record .*ValueError"),
        ("resnet18", "bad architecture record resnet18: TypeError"),
    ],
    ids=["width", "depth", "unknown-name", "bad-channels", "not-a-record"],
)
def test_checkpoint_whose_weights_do_not_match_its_arch(tmp_path, tiny_model, arch, message):
    torch.save({"state_dict": tiny_model.state_dict(), "arch": arch}, tmp_path / "m.pt")
    with pytest.raises(UserError, match=message):
        load_model(tmp_path / "m.pt")


def test_model_trained_for_another_dataset_is_refused(tmp_path):
    write_checkpoint(tmp_path / "m.pt", num_classes=3)
    with pytest.raises(UserError, match="model has 3 classes but the prepared dataset has 10"):
        load_model(tmp_path / "m.pt", num_classes=10)
