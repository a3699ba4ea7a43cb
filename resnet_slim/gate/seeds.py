"""Seed repeats: re-run the training stages of the pipeline once per extra seed, same data split.

Rather than a second copy of the recipe, the commands come from dvc.yaml itself: every stage
upstream of the models to repeat (the gate's reference and candidates), except the stages that make
the data, is run in a scratch workspace whose params.yaml differs only in `base.seed`. The prepared
data is linked in, not re-made, so every seed is scored on the same test images.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from resnet_slim.errors import UserError
from resnet_slim.params import Params, read_yaml
from resnet_slim.stats import across_seeds


def model_files(bench, names: list[str], *, source: str | Path) -> dict[str, str]:
    """{model: file} of the models to repeat (the gate's), as benchmark.json lists them."""
    models = (bench.get("models") if isinstance(bench, dict) else None) or {}
    missing = [n for n in names if not isinstance(models.get(n), dict) or "file" not in models[n]]
    if missing:
        raise UserError(
            f"{source}: no benchmark rows for {missing} (gate.reference / "
            f"candidates); seed repeats need the same models"
        )
    return {n: models[n]["file"] for n in names}


def repeat_runs(
    seeds: list[int],
    *,
    repo: Path,
    params: dict,
    stages: dict,
    order: list[str],
    keep: set[str],
    score,
    log,
) -> list[dict]:
    """One run per seed: `order` re-run in a scratch workspace (removed after), then
    `score(scratch)` -> {model: top-1 %} on the shared test split."""
    runs = []
    for seed in seeds:
        start, scratch = time.perf_counter(), scratch_dir(repo)
        try:
            run_seed(
                seed,
                repo=repo,
                params=params,
                stages=stages,
                order=order,
                keep=keep,
                scratch=scratch,
                log=log,
            )
            scores = score(scratch)
        finally:
            remove(scratch)
        runs.append({"seed": seed, "top1": scores, "minutes": (time.perf_counter() - start) / 60})
        log(f"seed {seed}: " + ", ".join(f"{n} {v:.2f}%" for n, v in scores.items()))
    return runs


def seed_summary(
    bench: dict, names: list[str], params: Params, *, repeats: list[dict], rerun_stages: list[str]
) -> dict:
    """seeds.json: the main run (benchmark.json's top-1s) and the repeats, mean ± std and CI per
    model, and the per-seed drops vs the reference that the gate uses."""
    models, ref = bench["models"], params.gate.reference
    runs = [
        {
            "seed": params.base.seed,
            "top1": {n: models[n].get("top1") for n in names},
            "source": "main run",
        },
        *repeats,
    ]

    def across(values):
        return across_seeds(values, level=params.benchmark.ci_level)

    return {
        "seeds": [r["seed"] for r in runs],
        "repeats": bool(repeats),
        "models": names,
        "rerun_stages": rerun_stages,
        "runs": runs,
        # what the main run measured: the gate uses these repeats only for the same files and split
        "benchmark_models": {n: {k: models[n].get(k) for k in ("file", "sha256")} for n in names},
        "test_split": bench.get("test_split"),
        "top1": {n: across([r["top1"][n] for r in runs]) for n in names},
        "drop_pp": {
            n: across([r["top1"][ref] - r["top1"][n] for r in runs]) for n in names if n != ref
        },
    }


def _paths(entries) -> list[str]:
    """dvc.yaml deps/outs/metrics/plots entries (strings or {path: options}) -> paths."""
    paths = []
    for entry in entries or []:
        paths.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return [str(p).rstrip("/") for p in paths]


def read_stages(dvc_yaml: str | Path) -> dict[str, dict]:
    """{stage: {"cmd", "deps", "outs"}} of a dvc.yaml, foreach groups expanded (see below)."""
    path = Path(dvc_yaml)
    try:
        pipeline = read_yaml(path) or {}  # duplicate stage names are an error
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: cannot read the pipeline ({err.__class__.__name__})") from None
    params_path = path.with_name("params.yaml")  # DVC's default source of ${section.key}
    params = read_yaml(params_path) if params_path.is_file() else {}
    return read_stages_from(pipeline, source=str(path), params=params)


def read_stages_from(
    pipeline: dict, source: str = "dvc.yaml", params: dict | None = None
) -> dict[str, dict]:
    stages = pipeline.get("stages") if isinstance(pipeline, dict) else None
    if not isinstance(stages, dict):
        raise UserError(f"{source}: no stages")
    result = {}
    for name, stage in stages.items():
        for full_name, body in _expand_foreach(name, stage, source):
            if not isinstance(body.get("cmd"), str):
                raise UserError(f"{source}: stage '{full_name}' has no single cmd")

            def resolve(paths: list[str], stage_name: str = full_name) -> list[str]:
                return [_params_value(p, params or {}, source, stage_name) for p in paths]

            outs = [p for key in ("outs", "metrics", "plots") for p in _paths(body.get(key))]
            result[full_name] = {
                "cmd": _params_value(body["cmd"], params or {}, source, full_name),
                "deps": resolve(_paths(body.get("deps"))),
                "outs": resolve(outs),
            }
    return result


def _params_value(text: str, params: dict, source: str, stage: str) -> str:
    """`text` with each `${section.key}` replaced by its params.yaml value, as DVC does."""

    def lookup(match: re.Match) -> str:
        value = params
        for part in match.group(1).split("."):
            if not isinstance(value, dict) or part not in value:
                raise UserError(
                    f"{source}: stage '{stage}': {match.group(0)} is not in params.yaml"
                )
            value = value[part]
        return str(value)

    return re.sub(r"\$\{([A-Za-z_][\w.]*)\}", lookup, text)


def _expand_foreach(name: str, stage, source: str) -> list[tuple[str, dict]]:
    """A stage, or the `name@item` stages of a `foreach: [...]` / `foreach: {key: {...}}` group,
    with `${item}`, `${key}` and `${item.field}` substituted the way DVC does."""
    if not isinstance(stage, dict):
        raise UserError(f"{source}: stage '{name}' is not a mapping")
    if "matrix" in stage:
        raise UserError(
            f"{source}: stage '{name}' uses matrix, which seed repeats do not expand; use foreach"
        )
    if "foreach" not in stage:
        return [(name, stage)]
    items, body = stage["foreach"], stage.get("do")
    if isinstance(items, list):
        pairs = [(str(item), item) for item in items]
    elif isinstance(items, dict):
        pairs = list(items.items())
    else:
        raise UserError(
            f"{source}: stage '{name}': foreach must be a list or a mapping "
            f"(seed repeats do not resolve {items!r})"
        )
    if not isinstance(body, dict):
        raise UserError(f"{source}: stage '{name}': foreach needs a `do:` mapping")

    def fill(value, key, item):
        if isinstance(value, str):
            value = value.replace("${key}", str(key))
            if isinstance(item, dict):
                for field, field_value in item.items():
                    value = value.replace("${item." + str(field) + "}", str(field_value))
            else:
                value = value.replace("${item}", str(item))
            if "${" in value:
                raise UserError(
                    f"{source}: stage '{name}@{key}': cannot resolve "
                    f"{value[value.index('${') :][:40]!r} for seed repeats"
                )
            return value
        if isinstance(value, list):
            return [fill(v, key, item) for v in value]
        if isinstance(value, dict):
            return {fill(k, key, item): fill(v, key, item) for k, v in value.items()}
        return value

    return [(f"{name}@{key}", fill(body, key, item)) for key, item in pairs]


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


def run_seed(
    seed: int,
    *,
    repo: Path,
    params: dict,
    stages: dict,
    order: list[str],
    keep: set[str],
    scratch: Path,
    log,
) -> None:
    """Run `order` in `scratch` with base.seed = seed; shared outputs are symlinked from `repo`."""
    for code in ("stages", "resnet_slim"):  # `python -m stages.x` runs this workspace's code
        (scratch / code).symlink_to((repo / code).resolve(), target_is_directory=True)
    for out in shared_outputs(stages, keep):
        source, link = (repo / out).resolve(), scratch / out
        if not source.exists():
            raise UserError(f"{out}: missing; run `dvc repro` once before seed repeats")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source, target_is_directory=source.is_dir())
    seeded = {**params, "base": {**params["base"], "seed": seed, "seeds": []}}
    seeded = _absolute_model_paths(seeded, repo)
    (scratch / "params.yaml").write_text(yaml.safe_dump(seeded, sort_keys=False))
    for folder in ("models", "reports", "data"):
        (scratch / folder).mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for name in order:
        start = time.perf_counter()
        result = subprocess.run(
            stages[name]["cmd"], shell=True, cwd=scratch, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise UserError(
                f"seed {seed}: stage '{name}' failed (exit {result.returncode}): {last}"
            )
        log(f"seed {seed}: {name} done in {time.perf_counter() - start:.0f} s")


def _absolute_model_paths(params: dict, repo: Path) -> dict:
    """teacher.init / distill.student.init relative to the repo, made absolute for the scratch
    workspace (it sits elsewhere, so `../shared/x.th` would name another file there)."""
    params = {**params}
    for section, sub in (("teacher", None), ("distill", "student")):
        block = params.get(section)
        target = block.get(sub) if sub and isinstance(block, dict) else block
        if isinstance(target, dict) and isinstance(target.get("init"), str) and target["init"]:
            target = {**target, "init": str((repo / target["init"]).resolve())}
            params[section] = {**block, sub: target} if sub else target
    return params


def scratch_dir(repo: Path) -> Path:
    """A temporary workspace next to the repo (same file system, so large files stay cheap)."""
    parent = repo / "models"
    parent.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".seed-", dir=parent))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
