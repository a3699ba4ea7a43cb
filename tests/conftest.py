"""Shared fixtures: tiny prepared datasets and tiny models, so every test runs in seconds."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from resnet_slim.data import prepare
from resnet_slim.train.models import build_model, make_arch

REPO = Path(__file__).resolve().parents[1]
# Stage scripts run by path in subprocesses (cwd: a temp dir) import this checkout's library; a
# workspace's own `python -m stages.x` still comes first (sys.path[0] is its cwd).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def dvc_env(**extra: str) -> dict:
    """The environment for `dvc` / `git` in a throw-away repo: this interpreter's directory first on
    PATH (dvc runs stage commands as `python -m stages.x`, also when pytest runs outside
    `make test`) and a git identity for commits; `extra` on top."""
    identity = {
        f"GIT_{who}_{what}": value
        for who in ("AUTHOR", "COMMITTER")
        for what, value in (("NAME", "t"), ("EMAIL", "t@t"))
    }
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, **identity, **extra}


def prepared_digits(folder: Path, *, per_class: int, held_out: float) -> Path:
    """Digits at 8 px, `per_class` per class, `held_out` each for val and test, written by the
    library as a real prepared dataset directory."""
    out = folder / "prepared"
    raw = prepare.subsample_per_class(prepare.load_digits(8), per_class, seed=0)
    split = prepare.stratified_split(
        raw.labels, val_fraction=held_out, test_fraction=held_out, seed=0
    )
    prepare.write_prepared(out, raw, split, extra_meta={"source": "digits"})
    return out


def pytest_collection_modifyitems(items):
    """The e2e tests (minutes) first, the rest in file order: with `make test`'s pytest-xdist
    (--dist loadfile --no-loadscope-reorder) one worker starts them at once and the others take
    the rest of the suite meanwhile, instead of the e2e file starting half-way through."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """Digits at 8 px, 40 per class."""
    return prepared_digits(tmp_path_factory.mktemp("data"), per_class=40, held_out=0.2)


@pytest.fixture
def fresh_signal_state():
    """errors.py keeps a stage's signal state in process-wide events (a stage runs once per
    process); a test that runs run_stage in pytest's process would leave `_finished` set for the
    next test in the same worker, whose simulated signal would then be ignored."""
    from resnet_slim import errors

    events = ("_finished", "_interrupting", "_deferring", "_deferred", "_watchdog_armed")
    for name in events:
        getattr(errors, name).clear()
    yield
    for name in events:
        getattr(errors, name).clear()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second intra-op thread and lose a lot when the other core
    is busy; also undoes a stage's seed_everything(threads=...)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_one_line_error(result, code: int, *words: str) -> str:
    """A stage's bad-input exit: `code`, one `error:` line holding `words`, no traceback."""
    stderr = result.stderr.strip()
    assert result.returncode == code, (result.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(make_arch(name="resnet18", num_classes=10, width=8, small_input=True)).eval()


def write_image_tree(root: Path, classes: dict[str, int], size: int = 12, seed: int = 0) -> Path:
    """root/<class>/<i>.png with distinct random images; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# the paths dvc.yaml passes the gate stage (it has no path defaults), relative to a run directory
GATE_ARGS = [
    "--benchmark",
    "reports/benchmark.json",
    "--predictions",
    "reports/predictions.csv",
    "--seeds",
    "reports/seeds.json",
    "--data",
    "data/prepared",
    "--out",
    "reports/gate.json",
]


def absent_gate_inputs(folder: Path) -> list[str]:
    """The gate's other required inputs, absent: no predictions, no seed repeats, no split."""
    return [
        "--predictions",
        str(folder / "p.csv"),
        "--seeds",
        str(folder / "s.json"),
        "--data",
        str(folder / "prepared"),
    ]


def write_params(path: Path, **overrides) -> Path:
    """params.yaml = the repo's defaults with `section={key: value}` overrides (tiny settings)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # the default dataset folder is relative to the repo; stages in tests run from a temp dir
    params["prepare"]["root"] = str(REPO / params["prepare"]["root"])
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params))
    return path
