"""Shared fixtures: tiny prepared datasets and tiny models, so every test runs in seconds."""

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from resnet_slim.checkpoints import save_checkpoint
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


def random_bn_statistics(model):
    """`model` in eval mode with random BN scales, shifts and statistics (not the init's 1 / 0), so
    pruning criteria and removals have something to tell apart; drawn from torch's global RNG."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.1)
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


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


# --------------------------------------------------------------------------------------------
# helpers for the bad-input tests of several files: tiny params and models, stage mains, and
# the check that a failed stage wrote nothing


def tiny_arch(num_classes: int = 10) -> dict:
    """The architecture record of `tiny_model`: ResNet-18 at width 8 for small images."""
    return make_arch(name="resnet18", num_classes=num_classes, width=8, small_input=True)


def write_checkpoint(path: Path, num_classes: int = 10) -> Path:
    """An untrained `tiny_arch` model (seeded weights) saved as this project's checkpoint."""
    torch.manual_seed(0)
    save_checkpoint(
        path,
        model=build_model(tiny_arch(num_classes)),
        arch=tiny_arch(num_classes),
        params={},
        metrics={},
    )
    return path


def assert_not_written(*paths: Path) -> None:
    """The output is absent and no atomic-write temp file (`.<name>.tmp-<pid>`) is left beside
    it."""
    for path in paths:
        assert not path.exists(), f"{path} was written"
        if path.parent.is_dir():
            leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}.tmp-*"))
            assert not leftovers, f"temp files left beside {path}: {leftovers}"


def no_temp_files(root: Path) -> list[str]:
    """The atomic-write temp files (`.<name>.tmp-*`) anywhere under root; [] when none."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp-*"))


def stage_main(name: str) -> Callable:
    """The `main(argv)` of stages/<name>.py, to run a stage in-process (no start-up cost)."""
    import importlib

    return importlib.import_module(f"stages.{name}").main


def tiny_params(path: Path, **overrides) -> Path:
    """Repo params with tiny training settings (width 8, one epoch), plus overrides."""
    tiny = {
        "teacher": {"width": 8, "epochs": 1, "batch_size": 64, "warmup_epochs": 0},
        "distill": {"epochs": 1, "train_baseline": False},
        "ptq": {"calibration_images": 16},
        "qat": {"epochs": 1, "calibration_images": 16},
    }
    for section, values in overrides.items():
        tiny[section] = {**tiny.get(section, {}), **values}
    return write_params(path, **tiny)


def imagefolder_params(path: Path, root: Path, **prepare) -> Path:
    """tiny_params reading the imagefolder at root (8 px; 20% each for val and test)."""
    return tiny_params(
        path,
        prepare={
            "source": "imagefolder",
            "root": str(root),
            "image_size": 8,
            "val_fraction": 0.2,
            "test_fraction": 0.2,
            **prepare,
        },
    )


def imagefolder_with(d: Path, bad: bytes, *, class_dir: bool = False) -> Path:
    """d/imgs with classes a and b (6 images each) where a/0.png, or with `class_dir` the folder
    b, is renamed to the raw bytes `bad` (a name that is not UTF-8 or holds a newline)."""
    root = write_image_tree(d / "imgs", {"a": 6, "b": 6}, size=8)
    if class_dir:
        os.rename(bytes(root / "b"), bytes(root) + b"/" + bad)
    else:
        os.rename(bytes(root / "a" / "0.png"), bytes(root / "a") + b"/" + bad)
    return root


# benchmark.json numbers for the teacher and the two default release candidates
GOOD_BENCH = {
    "teacher": {"top1": 98.0, "p50_ms": 8.0, "size_mb": 44.0},
    "student_qat_int8": {"top1": 97.8, "p50_ms": 1.0, "size_mb": 1.0},
    "pruned_qat_int8": {"top1": 97.9, "p50_ms": 2.0, "size_mb": 3.0},
}


@pytest.fixture
def prepared_copy(tmp_path, tiny_prepared) -> Path:
    """A copy of tiny_prepared in this test's tmp_path, for a test to damage."""
    import shutil

    return Path(shutil.copytree(tiny_prepared, tmp_path / "prepared"))


def peak_rss_kb() -> int:
    """This process's peak resident memory so far, in KB (Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_prepare_stage(
    tmp_path: Path, params: Path, stage: str = "prepare"
) -> subprocess.CompletedProcess:
    """`python -m stages.<stage>` (prepare) in tmp_path, writing tmp_path/prepared."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--params", str(params)]
        + ["--out", str(tmp_path / "prepared")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=120,
    )
