"""Compression presets: named partial params files (`params/<name>.yaml`) run as DVC experiments.

A preset lists only the keys it changes. `preset_overrides` merges one or more presets over
params.yaml in order, validates the result with the schema every stage uses (a typo fails here,
not ten minutes into a run) and returns DVC's `-S key=value` arguments, so a preset is an ordinary
`dvc exp run` that `dvc exp show` / `dvc params diff` / stages/compare_experiments.py can compare.
Data presets and level presets compose: `python -m stages.preset cifar10-dev medium`.
"""

import json
from pathlib import Path

import yaml

from resnet_slim.errors import UserError
from resnet_slim.params import merged, parse_params, read_yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "params"


def available_presets(directory: Path = PRESET_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def describe_preset(name: str, directory: Path = PRESET_DIR) -> str:
    """The preset file's first comment line (what it is for)."""
    for line in (Path(directory) / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_preset(name: str, directory: Path = PRESET_DIR) -> dict:
    path = Path(directory) / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown preset {name!r}; choose from {available_presets(directory)} "
            f"(files in {directory})"
        )
    try:
        overlay = read_yaml(path)  # duplicate keys are an error, as in params.yaml
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(overlay, dict) or not overlay:
        raise UserError(
            f"{path}: expected a mapping of params sections, e.g. 'prune: {{ratio: 0.4}}'"
        )
    return overlay


def _yaml_value(value) -> str:
    """The text DVC's -S parses back (as YAML) to `value`: strings bare unless that would change
    their type ("1.0", "true", "null"), everything else as JSON, which is YAML."""
    if isinstance(value, str) and yaml.safe_load(value) == value and "," not in value:
        return value
    return json.dumps(value)


def flatten_overrides(overlay: dict, prefix: str = "") -> list[str]:
    """{"prune": {"ratio": 0.4}} -> ["prune.ratio=0.4"]; lists and empty sections stay whole."""
    out = []
    for key, value in overlay.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += flatten_overrides(value, name + ".")
        else:
            out.append(f"{name}={_yaml_value(value)}")
    return out


def preset_overrides(
    names: list[str], params_path: str | Path = "params.yaml", directory: Path = PRESET_DIR
) -> list[str]:
    """-S arguments for `names` applied in order over params.yaml; validated before returning."""
    if not names:
        raise UserError(f"name at least one preset; available: {available_presets(directory)}")
    try:
        params = read_yaml(Path(params_path)) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{params_path}: cannot read params ({err.__class__.__name__})") from None
    overlay: dict = {}
    for name in names:
        overlay = merged(overlay, load_preset(name, directory))
    parse_params(merged(params, overlay), source=f"preset {'+'.join(names)} over {params_path}")
    return flatten_overrides(overlay)


def exp_run_command(names: list[str], overrides: list[str], *, queue: bool = False) -> list[str]:
    """`dvc exp run -n preset-<names> -S ...` (the name is what the comparison table shows)."""
    command = ["dvc", "exp", "run", "-n", "preset-" + "-".join(names)]
    for item in overrides:
        command += ["-S", item]
    return command + (["--queue"] if queue else [])


def preset_commands(
    names: list[str], params_path, extra: list[str], *, combine: bool, queue: bool
) -> list[list[str]]:
    """The `dvc exp run` command(s) for `names` (+ `extra` KEY=VALUE overrides), all validated.

    Several presets run as separate experiments (a sweep) unless combined into one."""
    if not names:
        raise UserError(f"name a preset; available: {available_presets()}")
    for item in extra:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. gate.enforce=false")
    if len(names) > 1 and not (combine or queue):
        # `dvc exp run` leaves its -S values in the workspace's params.yaml, so back-to-back runs
        # would inherit each other's keys; queued experiments each start from the last commit
        raise UserError(
            "several presets: add --queue (one experiment each, from the last commit) "
            "or --combine (one experiment with all of them)"
        )
    groups = [names] if combine or len(names) == 1 else [[name] for name in names]
    return [
        exp_run_command(group, preset_overrides(group, params_path) + extra, queue=queue)
        for group in groups
    ]
