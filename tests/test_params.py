import pytest

from resnet_slim.errors import UserError
from resnet_slim.params import load_params
from tests.conftest import REPO, write_params


def test_repo_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.teacher.arch == "resnet18" and params.teacher.width == 64
    assert params.gate.max_acc_drop_pp == 1.0 and params.gate.enforce
    assert params.prepare.split == "auto"


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("prune", {"raito": 0.3}, "prune.raito: unknown key"),
        ("prune", {"ratio": 1.0}, "prune.ratio: Input should be less than 1"),
        ("teacher", {"epochs": 0}, "teacher.epochs: Input should be greater than 0"),
        ("teacher", {"arch": "vgg16"}, "teacher.arch: Input should be 'resnet18'"),
        ("prepare", {"source": "mnist"}, "prepare.source"),
        (
            "prepare",
            {"split": "official"},
            "prepare.split: Input should be 'auto', 'given' or 'random'",
        ),
        ("benchmark", {"threads": 0}, "benchmark.threads"),
        ("gate", {"min_speedup": -1}, "gate.min_speedup"),
        ("teacher", {"lr": "fast"}, "teacher.lr: Input should be a valid number"),
    ],
)
def test_bad_params_name_the_key_and_value(tmp_path, section, values, message):
    path = write_params(tmp_path / "params.yaml", **{section: values})
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_params(path)


def test_missing_or_malformed_params_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("teacher: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
