"""Compression presets (params/*.yaml): valid over params.yaml, turned into the right dvc -S
args."""

import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from resnet_slim import presets
from resnet_slim.errors import UserError

LEVELS = ["light", "medium", "aggressive"]


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """What `dvc exp run -S key=value` does to params.yaml: set the dotted key to the YAML value."""
    params = yaml.safe_load(yaml.safe_dump(params))
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        section = params
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = yaml.safe_load(value)
    return params


@pytest.mark.parametrize("name", presets.available_presets())
def test_every_shipped_preset_is_valid_over_params_yaml(name):
    overrides = presets.preset_overrides([name], REPO / "params.yaml")
    assert overrides and presets.describe_preset(name)


def test_the_three_levels_exist_and_set_the_same_keys():
    # each level fully defines what it selects, so the levels differ only in values
    keys = {
        name: {o.split("=")[0] for o in presets.preset_overrides([name], REPO / "params.yaml")}
        for name in LEVELS
    }
    assert keys["light"] == keys["medium"] == keys["aggressive"]
    ratios = [presets.load_preset(name)["prune"]["ratio"] for name in LEVELS]
    assert ratios == sorted(ratios) and len(set(ratios)) == 3  # more pruning at each level


def test_overrides_reproduce_the_merged_params_when_dvc_applies_them():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for names in (["medium"], ["cifar10-dev", "aggressive"]):
        overlay = {}
        for name in names:
            overlay = presets.merged(overlay, presets.load_preset(name))
        overrides = presets.preset_overrides(names, REPO / "params.yaml")
        assert apply_overrides(params, overrides) == presets.merged(params, overlay)


@pytest.mark.parametrize(
    "value",
    [
        "imagefolder",
        "1.0",
        "true",
        "null",
        "a,b",
        0.4,
        3,
        True,
        None,
        ["onnx", "openvino"],
        "../shared/x",
    ],
)
def test_values_parse_back_to_the_same_type(value):
    key, text = presets.flatten_overrides({"s": {"k": value}})[0].split("=", 1)
    assert key == "s.k" and yaml.safe_load(text) == value


def test_later_presets_win_and_the_command_is_named_after_them():
    merged = presets.merged({"prune": {"ratio": 0.2, "round_to": 16}}, {"prune": {"ratio": 0.6}})
    assert merged == {"prune": {"ratio": 0.6, "round_to": 16}}
    command = presets.exp_run_command(["cifar10-dev", "medium"], ["prune.ratio=0.4"], queue=True)
    assert command == [
        "dvc",
        "exp",
        "run",
        "-n",
        "preset-cifar10-dev-medium",
        "-S",
        "prune.ratio=0.4",
        "--queue",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("prune:\n  ratoi: 0.4\n", "prune.ratoi: unknown key"),
        ("prune:\n  ratio: 1.5\n", "prune.ratio"),
        ("- a\n- b\n", "expected a mapping"),
        ("prune: [\n", "not valid YAML"),
    ],
)
def test_a_bad_preset_file_is_rejected_before_anything_runs(tmp_path, text, message):
    (tmp_path / "broken.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        presets.preset_overrides(["broken"], REPO / "params.yaml", directory=tmp_path)


def test_an_unknown_preset_names_the_available_ones():
    with pytest.raises(UserError, match="unknown preset 'huge'.*aggressive"):
        presets.preset_overrides(["huge"], REPO / "params.yaml")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "stages/preset.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_one_queued_experiment_per_preset_without_running_dvc():
    proc = run_cli(*LEVELS, "--queue", "--print", "--set", "gate.enforce=false")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3, proc.stderr
    for name, line in zip(LEVELS, lines, strict=True):
        assert line.startswith(f"$ dvc exp run -n preset-{name} ") and line.endswith(
            "-S gate.enforce=false --queue"
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["light", "medium"], "add --queue"),
        (["nope"], "unknown preset"),
        (["light", "--set", "gate.enforce"], "expected KEY=VALUE"),
        ([], "name a preset"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(args, message):
    proc = run_cli(*args, "--print")
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
