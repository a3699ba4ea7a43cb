"""Seed repeats: re-run the training stages of the pipeline once per extra seed, same data split.

Rather than a second copy of the recipe, the commands come from dvc.yaml itself: every stage
upstream of the models to repeat (the gate's reference and candidates), except the stages that make
the data, is run in a scratch workspace whose params.yaml differs only in `base.seed`. The prepared
data is linked in, not re-made, so every seed is scored on the same test images.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from resnet_slim.errors import UserError


def _paths(entries) -> list[str]:
    """dvc.yaml deps/outs/metrics/plots entries (strings or {path: options}) -> paths."""
    paths = []
    for entry in entries or []:
        paths.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return [str(p).rstrip("/") for p in paths]


def read_stages(dvc_yaml: str | Path) -> dict[str, dict]:
    """{stage: {"cmd", "deps", "outs"}} of a dvc.yaml without foreach/matrix templating."""
    path = Path(dvc_yaml)
    try:
        pipeline = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: cannot read the pipeline ({err.__class__.__name__})") from None
    return read_stages_from(pipeline, source=str(path))


def read_stages_from(pipeline: dict, source: str = "dvc.yaml") -> dict[str, dict]:
    stages = pipeline.get("stages") if isinstance(pipeline, dict) else None
    if not isinstance(stages, dict):
        raise UserError(f"{source}: no stages")
    path = source
    result = {}
    for name, stage in stages.items():
        if not isinstance(stage, dict) or not isinstance(stage.get("cmd"), str):
            raise UserError(f"{path}: stage '{name}' has no single cmd (foreach/matrix stages are "
                            f"not supported by seed repeats)")
        outs = [p for key in ("outs", "metrics", "plots") for p in _paths(stage.get(key))]
        result[name] = {"cmd": stage["cmd"], "deps": _paths(stage.get("deps")), "outs": outs}
    return result


def _producer(stages: dict, path: str) -> str | None:
    """The stage whose output is `path` or a directory containing it."""
    for name, stage in stages.items():
        if any(path == out or path.startswith(out + "/") for out in stage["outs"]):
            return name
    return None


def stages_to_rerun(stages: dict, targets: list[str], keep: set[str]) -> list[str]:
    """Stages needed to rebuild `targets`, in an order that respects their dependencies.

    Stages in `keep` (and everything upstream of them) are not re-run: their outputs are shared.
    """
    order, visiting = [], set()

    def visit(name: str) -> None:
        if name in order or name in keep:
            return
        if name in visiting:
            raise UserError(f"dvc.yaml: stage '{name}' depends on itself")
        visiting.add(name)
        for dep in stages[name]["deps"]:
            producer = _producer(stages, dep)
            if producer is not None and producer != name:
                visit(producer)
        visiting.discard(name)
        order.append(name)

    for target in targets:
        producer = _producer(stages, target)
        if producer is None:
            raise UserError(f"dvc.yaml: no stage produces '{target}'")
        visit(producer)
    return order


def shared_outputs(stages: dict, keep: set[str]) -> list[str]:
    return [out for name in keep if name in stages for out in stages[name]["outs"]]


def run_seed(seed: int, *, repo: Path, params: dict, stages: dict, order: list[str],
             keep: set[str], scratch: Path, log) -> None:
    """Run `order` in `scratch` with base.seed = seed; shared outputs are symlinked from `repo`."""
    (scratch / "stages").symlink_to((repo / "stages").resolve(), target_is_directory=True)
    for out in shared_outputs(stages, keep):
        source, link = (repo / out).resolve(), scratch / out
        if not source.exists():
            raise UserError(f"{out}: missing; run `dvc repro` once before seed repeats")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source, target_is_directory=source.is_dir())
    seeded = {**params, "base": {**params["base"], "seed": seed, "seeds": []}}
    (scratch / "params.yaml").write_text(yaml.safe_dump(seeded, sort_keys=False))
    for folder in ("models", "reports", "data"):
        (scratch / folder).mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in order:
        start = time.perf_counter()
        result = subprocess.run(stages[name]["cmd"], shell=True, cwd=scratch, env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise UserError(f"seed {seed}: stage '{name}' failed (exit {result.returncode}): {last}")
        log(f"seed {seed}: {name} done in {time.perf_counter() - start:.0f} s")


def scratch_dir(repo: Path) -> Path:
    """A temporary workspace next to the repo (same file system, so large files stay cheap)."""
    parent = repo / "models"
    parent.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".seed-", dir=parent))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
