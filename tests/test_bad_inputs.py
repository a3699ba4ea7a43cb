"""Every bad input gets one clear error, nothing is half-written, and the gate fails closed.

Two kinds of cases:

* Stage runs (`STAGE_CASES`): the stage script as `dvc repro` runs it, in a subprocess, checked for
  the exit code, exactly one `error: ...` line on stderr (no traceback) naming the problem, and no
  output or `.<name>.tmp-*` leftover. Starting a stage costs seconds (torch, onnxruntime imports),
  so all of them start together when this module starts, two at a time, while the in-process cases
  below run; each test then only waits for its own result.
* In-process cases: the library function or the stage's `main()` (same code, no start-up cost),
  checked for the `UserError` message and the same "nothing written" rule.
"""

import errno
import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from resnet_slim.compress import distill, export, qat, quant
from resnet_slim.data import loader as data
from resnet_slim.data import prepare
from resnet_slim.errors import UserError
from resnet_slim.io import save_checkpoint, sha256_file, write_json
from resnet_slim.params import TrainParams, load_params
from resnet_slim.train import engine
from resnet_slim.train.models import build_model, load_model, make_arch
from tests.conftest import (
    REPO,
    absent_gate_inputs,
    assert_one_line_error,
    write_image_tree,
    write_params,
)

# --------------------------------------------------------------------------------------------
# helpers


def tiny_arch(num_classes: int = 10) -> dict:
    return make_arch(name="resnet18", num_classes=num_classes, width=8, small_input=True)


def write_checkpoint(path: Path, num_classes: int = 10) -> Path:
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
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp-*"))


def run_script(
    script: str, args: list[str], cwd: Path, timeout: float = 240
) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "stages" / script), *args]
    run = functools.partial(
        subprocess.run, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    try:
        return run(command)
    except OSError as err:
        # EFAULT from exec in the vfork'ed child: seen once when this helper starts processes
        # from a thread while the main thread runs torch (a CPython/kernel race, not a stage
        # error); the stage never started, so starting it again tests the same thing
        if err.errno != errno.EFAULT:
            raise
        return run(command)


def stage_main(name: str) -> Callable:
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


GOOD_BENCH = {
    "teacher": {"top1": 98.0, "p50_ms": 8.0, "size_mb": 44.0},
    "student_qat_int8": {"top1": 97.8, "p50_ms": 1.0, "size_mb": 1.0},
    "pruned_qat_int8": {"top1": 97.9, "p50_ms": 2.0, "size_mb": 3.0},
}


# --------------------------------------------------------------------------------------------
# stage runs in subprocesses


@dataclass
class StageCase:
    script: str
    args: list[str]
    code: int  # expected exit code: 2 bad input, 1 gate failed
    words: list[str]  # each must appear in the single `error:` line
    not_written: list[Path] = field(default_factory=list)
    check: Callable[[], None] | None = None  # more assertions once the stage has exited


STAGE_CASES: dict[str, Callable[[Path, Path], StageCase]] = {}


def stage_case(setup: Callable[[Path, Path], StageCase]):
    """Register `case_<name>(workdir, prepared) -> StageCase`."""
    STAGE_CASES[setup.__name__.removeprefix("case_")] = setup
    return setup


@stage_case
def case_params_unknown_key(d, prepared):
    params = tiny_params(d / "params.yaml", prune={"raito": 0.3})
    return StageCase(
        "gate.py",
        [
            "--params",
            str(params),
            "--benchmark",
            str(d / "b.json"),
            *absent_gate_inputs(d),
            "--out",
            str(d / "gate.json"),
        ],
        2,
        ["prune.raito: unknown key"],
        [d / "gate.json"],
    )


@stage_case
def case_params_malformed_yaml(d, prepared):
    (d / "params.yaml").write_text("teacher:\n  epochs: [1, 2\nprune: {}\n")
    return StageCase(
        "prepare.py",
        ["--params", str(d / "params.yaml"), "--out", str(d / "prepared")],
        2,
        ["params.yaml: not valid YAML", "line"],
        [d / "prepared"],
    )


@stage_case
def case_params_not_text(d, prepared):
    (d / "params.yaml").write_bytes(b"\xff\xfe\x00\x81 binary junk")
    return StageCase(
        "gate.py",
        [
            "--params",
            str(d / "params.yaml"),
            "--benchmark",
            str(d / "b.json"),
            *absent_gate_inputs(d),
            "--out",
            str(d / "gate.json"),
        ],
        2,
        ["not a text file"],
        [d / "gate.json"],
    )


@stage_case
def case_prepare_truncated_image(d, prepared):
    root = write_image_tree(d / "imgs", {"a": 6, "b": 6}, size=8)
    png = (root / "a" / "0.png").read_bytes()
    (root / "a" / "0.png").write_bytes(png[: len(png) // 2])
    params = imagefolder_params(d / "params.yaml", root)
    return StageCase(
        "prepare.py",
        ["--params", str(params), "--out", str(d / "prepared")],
        2,
        ["bad image a/0.png", "truncated", "on_bad_image: skip"],
        [d / "prepared"],
    )


@stage_case
def case_prepare_class_too_small_to_split(d, prepared):
    root = write_image_tree(d / "imgs", {"a": 8, "b": 8, "rare": 1}, size=8)
    params = imagefolder_params(d / "params.yaml", root)
    return StageCase(
        "prepare.py",
        ["--params", str(params), "--out", str(d / "prepared")],
        2,
        ["cannot split 17 images", "smallest class: 1 image"],
        [d / "prepared"],
    )


@stage_case
def case_prepare_cifar10_missing(d, prepared):
    params = tiny_params(d / "params.yaml", prepare={"source": "cifar10", "root": str(d / "cifar")})
    return StageCase(
        "prepare.py",
        ["--params", str(params), "--out", str(d / "prepared")],
        2,
        ["CIFAR-10 not found", "cifar-10-batches-py", "never downloads"],
        [d / "prepared"],
    )


@stage_case
def case_train_loss_nan_keeps_previous_checkpoint(d, prepared):
    params = tiny_params(d / "params.yaml", teacher={"lr": 1e30})
    out = d / "models" / "teacher.pt"
    out.parent.mkdir()
    out.write_bytes(b"previous checkpoint")

    def check():
        assert out.read_bytes() == b"previous checkpoint"
        assert no_temp_files(d) == [] and not (d / "live" / "summary.json").exists()

    return StageCase(
        "train_teacher.py",
        [
            "--params",
            str(params),
            "--data",
            str(prepared),
            "--out",
            str(out),
            "--live",
            str(d / "live"),
        ],
        2,
        ["teacher: loss became", "at epoch 1, step", "lower the learning rate"],
        check=check,
    )


@stage_case
def case_export_truncated_checkpoint(d, prepared):
    good = write_checkpoint(d / "good.pt").read_bytes()
    (d / "model.pt").write_bytes(good[: len(good) // 3])
    return StageCase(
        "export.py",
        [
            str(d / "model.pt"),
            str(d / "model.onnx"),
            "--params",
            str(tiny_params(d / "params.yaml")),
            "--data",
            str(prepared),
            "--report",
            str(d / "parity.json"),
        ],
        2,
        ["model.pt: not a loadable checkpoint", "truncated or corrupt"],
        [d / "model.onnx", d / "parity.json"],
    )


@stage_case
def case_ptq_garbage_onnx(d, prepared):
    (d / "fp32.onnx").write_bytes(b"this is not protobuf" * 20)
    return StageCase(
        "ptq.py",
        [
            str(d / "fp32.onnx"),
            str(d / "int8.onnx"),
            "--dynamic-out",
            str(d / "dyn.onnx"),
            "--params",
            str(tiny_params(d / "params.yaml")),
            "--data",
            str(prepared),
        ],
        2,
        ["fp32.onnx: onnxruntime cannot load this model"],
        [d / "int8.onnx", d / "dyn.onnx"],
    )


@stage_case
def case_distill_truncated_teacher_cache(d, prepared):
    write_checkpoint(d / "teacher.pt")
    (d / "cache.pt").write_bytes(write_checkpoint(d / "other.pt").read_bytes()[:500])
    return StageCase(
        "distill_student.py",
        [
            "--teacher",
            str(d / "teacher.pt"),
            "--cache",
            str(d / "cache.pt"),
            "--data",
            str(prepared),
            "--out",
            str(d / "student.pt"),
            "--reports",
            str(d / "reports"),
            "--params",
            str(tiny_params(d / "params.yaml")),
        ],
        2,
        ["cache.pt: not a loadable teacher-output cache"],
        [d / "student.pt", d / "reports" / "metrics.json"],
    )


@stage_case
def case_cache_teacher_model_for_another_dataset(d, prepared):
    write_checkpoint(d / "teacher.pt", num_classes=3)
    return StageCase(
        "cache_teacher.py",
        [
            "--teacher",
            str(d / "teacher.pt"),
            "--data",
            str(prepared),
            "--out",
            str(d / "cache.pt"),
            "--params",
            str(tiny_params(d / "params.yaml")),
        ],
        2,
        ["model has 3 classes", "prepared dataset has 10"],
        [d / "cache.pt"],
    )


def _gate_case(
    d: Path, bench: str | None, code: int, words: list[str], reason: str, **gate
) -> StageCase:
    if bench is not None:
        (d / "bench.json").write_text(bench)
    params = tiny_params(d / "params.yaml", gate=gate)
    out = d / "reports" / "gate.json"
    out.parent.mkdir()
    write_json(out, {"passed": True, "release": "stale"})  # a passing verdict from an older run

    def check():
        verdict = json.loads(out.read_text())
        assert verdict["passed"] is False
        assert any(reason in failure for failure in verdict["failed"]), verdict["failed"]
        assert no_temp_files(d) == []

    return StageCase(
        "gate.py",
        [
            "--params",
            str(params),
            "--benchmark",
            str(d / "bench.json"),
            *absent_gate_inputs(d),
            "--out",
            str(out),
        ],
        code,
        words,
        check=check,
    )


@stage_case
def case_gate_benchmark_missing(d, prepared):
    return _gate_case(d, None, 2, ["bench.json: benchmark results not found"], "not found")


@stage_case
def case_gate_benchmark_empty_file(d, prepared):
    return _gate_case(d, "", 2, ["benchmark results is not valid JSON"], "not valid JSON")


@stage_case
def case_gate_nan_metric(d, prepared):
    bench = json.dumps(
        {"models": {**GOOD_BENCH, "rel": {"top1": math.nan, "p50_ms": 1.0, "size_mb": 1.0}}}
    )
    assert "NaN" in bench  # Python writes the JSON NaN literal, as a buggy tool would
    return _gate_case(
        d,
        bench,
        1,
        ["release 'rel' FAILED", "metric rel.top1 is nan"],
        "metric rel.top1 is nan",
        release="rel",
    )


@stage_case
def case_gate_auto_without_candidates(d, prepared):
    return _gate_case(
        d,
        json.dumps({"models": GOOD_BENCH}),
        1,
        ["gate.candidates is empty"],
        "gate.candidates is empty",
        release="auto",
        candidates=[],
    )


@stage_case
def case_gate_upper_ci_without_predictions(d, prepared):
    # upper_ci needs per-image predictions; without them the accuracy check fails closed
    case = _gate_case(
        d,
        json.dumps({"models": GOOD_BENCH}),
        1,
        ["release 'student_qat_int8' FAILED", "per-image predictions not found"],
        "cannot compute the CI of the drop",
        release="student_qat_int8",
        acc_drop_statistic="upper_ci",
    )
    case.args += ["--predictions", str(d / "predictions.csv"), "--seeds", str(d / "seeds.json")]
    return case


@stage_case
def case_gate_predictions_not_class_numbers(d, prepared):
    (d / "predictions.csv").write_text("image,label,teacher,student_qat_int8\n0,1,1,cat\n")
    case = _gate_case(
        d,
        json.dumps({"models": GOOD_BENCH}),
        1,
        ["are not whole class numbers"],
        "columns ['student_qat_int8'] are not whole class numbers",
        release="student_qat_int8",
    )
    case.args += ["--predictions", str(d / "predictions.csv"), "--seeds", str(d / "seeds.json")]
    return case


@stage_case
def case_gate_seed_repeats_not_json(d, prepared):
    (d / "seeds.json").write_text("{broken")
    case = _gate_case(
        d,
        json.dumps({"models": GOOD_BENCH}),
        2,
        ["seed repeats is not valid JSON"],
        "seed repeats is not valid JSON",
        release="student_qat_int8",
    )
    case.args += ["--seeds", str(d / "seeds.json")]
    return case


def _selected_stage_cases(session) -> list[str]:
    names = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if item.originalname == "test_stage_fails_cleanly" and callspec is not None:
            names.append(callspec.params["case"])
    return names


@pytest.fixture(scope="module", autouse=True)
def stage_runs(request, tmp_path_factory, tiny_prepared):
    """Start every selected stage case now, two at a time, while the in-process cases run."""
    runs = {}
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for name in _selected_stage_cases(request.session):
            workdir = tmp_path_factory.mktemp(name)
            case = STAGE_CASES[name](workdir, tiny_prepared)
            runs[name] = (case, pool.submit(run_script, case.script, case.args, workdir))
        yield runs


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_stage_fails_cleanly(stage_runs, case):
    spec, future = stage_runs[case]
    assert_one_line_error(future.result(), spec.code, *spec.words)
    assert_not_written(*spec.not_written)
    if spec.check is not None:
        spec.check()


def test_sigterm_mid_training_leaves_no_output_and_a_rerun_completes(tmp_path, tiny_prepared):
    params = tiny_params(tmp_path / "params.yaml", teacher={"epochs": 500})
    out = tmp_path / "models" / "teacher.pt"
    args = [
        "--params",
        str(params),
        "--data",
        str(tiny_prepared),
        "--out",
        str(out),
        "--live",
        str(tmp_path / "live"),
    ]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "stages" / "train_teacher.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(240, proc.kill)  # readline() below has no timeout of its own
    watchdog.start()
    try:
        first = proc.stdout.readline()  # "teacher epoch 1/500: ..." (printed with flush)
        assert first.startswith("teacher epoch 1/500"), (first, proc.stderr.read()[-2000:])
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip() == "error: interrupted; no outputs were written"
    assert_not_written(out, tmp_path / "live" / "summary.json")
    assert no_temp_files(tmp_path) == []
    # the same command again (one epoch, to keep the test short) completes over what was left
    stage_main("train_teacher")(["--params", str(tiny_params(tmp_path / "again.yaml")), *args[2:]])
    assert load_model(out)[1]["arch"]["width"] == 8
    assert no_temp_files(tmp_path) == []


# --------------------------------------------------------------------------------------------
# params


BAD_VALUES = [
    ("teacher", {"lr": "fast"}, "teacher.lr: Input should be a valid number"),
    (
        "base",
        {"augment": {"hflip": "maybe"}},
        "base.augment.hflip: Input should be a valid boolean",
    ),
    ("teacher", {"epochs": 2.5}, "teacher.epochs: Input should be a valid integer"),
    ("prune", {"ratio": 1.0}, "prune.ratio: Input should be less than 1"),
    ("teacher", {"epochs": 0}, "teacher.epochs: Input should be greater than 0"),
    ("qat", {"epochs": -1}, "qat.epochs: Input should be greater than 0"),
    ("base", {"threads": 0}, "base.threads: Input should be greater than or equal to 1"),
    ("benchmark", {"threads": 0}, "benchmark.threads: Input should be greater than or equal to 1"),
    ("prune", {"temperature": 0}, "prune.temperature: Input should be greater than 0"),
    ("distill", {"temperature": -1.0}, "distill.temperature: Input should be greater than 0"),
    ("distill", {"alpha": 1.5}, "distill.alpha: Input should be less than or equal to 1"),
    ("prune", {"kd_alpha": -0.1}, "prune.kd_alpha: Input should be greater than or equal to 0"),
    ("gate", {"min_speedup": -1}, "gate.min_speedup: Input should be greater than or equal to 0"),
    ("gate", {"max_size_ratio": 0}, "gate.max_size_ratio: Input should be greater than 0"),
    ("gate", {"max_size_mb": -5}, "gate.max_size_mb: Input should be greater than 0"),
    ("teacher", {"arch": "vgg16"}, "teacher.arch: Input should be 'resnet18'"),
    ("distill", {"student": {"arch": "vit"}}, "distill.student.arch: Input should be 'resnet18'"),
    ("prepare", {"source": "mnist"}, "prepare.source: Input should be 'digits'"),
    (
        "prepare",
        {"image_size": 4},
        "prepare.image_size: Input should be greater than or equal to 8",
    ),
    ("teacher", {"lr": math.inf}, "teacher.lr: Input should be a finite number"),
    (
        "gate",
        {"max_acc_drop_pp": math.nan},
        "gate.max_acc_drop_pp: Input should be a finite number",
    ),
    ("export", {"opset": 99}, "export.opset: Value error, this torch exports ONNX opsets up to"),
]


@pytest.mark.parametrize(
    "section, values, message",
    BAD_VALUES,
    ids=[f"{s}.{next(iter(v))}={next(iter(v.values()))}" for s, v, _ in BAD_VALUES],
)
def test_bad_param_values_name_key_and_value(tmp_path, section, values, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_params(write_params(tmp_path / "params.yaml", **{section: values}))


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "params file not found"),
        ("- teacher\n- prune\n", "expected a mapping of sections at the top level"),
        ("", "teacher: Field required"),
        ("teacher: {epochs: 1}\nprune: null\n", "prune: Input should be a valid dictionary"),
        ("teacher: {epochs: 1\n", "not valid YAML (ParserError at line 2"),
    ],
    ids=["missing", "a-list", "empty", "null-section", "malformed"],
)
def test_bad_params_files(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_params(path)


# --------------------------------------------------------------------------------------------
# data: imagefolder and prepared datasets


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "a/broken.png",
            b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
            "a/broken.png: UnidentifiedImageError: not a recognised image",
        ),
        ("a/notes.txt", b"not an image", "a/notes.txt: ValueError: not an image file type (.txt)"),
        ("a/empty.png", b"", "a/empty.png: ValueError: empty file"),
        ("b/README", b"hello", "b/README: ValueError: not an image file type (no suffix)"),
    ],
    ids=["corrupt", "not-an-image-type", "zero-bytes", "no-suffix"],
)
def test_bad_image_files_fail_naming_the_file(tmp_path, name, content, message):
    root = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=8)
    (root / name).write_bytes(content)
    with pytest.raises(
        UserError, match=f"bad image {message.replace('(', '[(]').replace(')', '[)]')}"
    ):
        prepare.load_imagefolder(root, 8)


def _save_mode(path: Path, mode: str) -> None:
    gradient = np.linspace(0, 1, 64).reshape(8, 8)
    if mode == "I;16":
        Image.fromarray((gradient * 4000).astype(np.uint16)).save(path)  # 16-bit PNG
    elif mode == "F":
        Image.fromarray(gradient.astype(np.float32)).save(path)  # float TIFF in [0, 1]
    else:
        Image.fromarray((gradient * 255).astype(np.uint8)).convert(mode).save(path)


@pytest.mark.parametrize(
    "mode, suffix",
    [
        ("L", "png"),
        ("LA", "png"),
        ("RGBA", "png"),
        ("P", "png"),
        ("1", "png"),
        ("I;16", "png"),
        ("F", "tif"),
        ("CMYK", "jpg"),
    ],
)
def test_unusual_image_modes_are_accepted_and_converted(tmp_path, mode, suffix):
    root = write_image_tree(tmp_path / "imgs", {"a": 2, "b": 2}, size=8)
    _save_mode(root / "a" / f"odd.{suffix}", mode)
    with Image.open(root / "a" / f"odd.{suffix}") as image:
        assert image.mode == mode
    raw = prepare.load_imagefolder(root, 8)
    odd = raw.images[raw.ids.index(f"a/odd.{suffix}")]
    assert raw.images.shape == (5, 8, 8, 3) and raw.images.dtype == np.uint8 and not raw.skipped
    if mode not in ("1", "CMYK"):  # a gradient, scaled to 8 bits: not clipped to black or white
        assert odd.max() >= 200 and odd.min() <= 30 and len(np.unique(odd)) > 8


def test_empty_class_directory_is_an_error(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=8)
    (root / "c").mkdir()
    with pytest.raises(UserError, match="class 'c' has no readable images"):
        prepare.load_imagefolder(root, 8)


def test_class_of_only_bad_files_is_an_error_even_when_skipping(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 3}, size=8)
    (root / "b").mkdir()
    (root / "b" / "x.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="class 'b' has no readable images"):
        prepare.load_imagefolder(root, 8, on_bad_image="skip")


@pytest.mark.parametrize(
    "layout, message",
    [
        ("single_class", "found 1 class directories; need at least 2"),
        ("missing", "imagefolder root not found"),
        ("a_file", "imagefolder root not found"),
    ],
    ids=["single-class", "missing", "a-file"],
)
def test_imagefolder_root_problems(tmp_path, layout, message):
    root = tmp_path / "imgs"
    if layout == "single_class":
        write_image_tree(root, {"only": 4}, size=8)
    elif layout == "a_file":
        root.write_text("not a directory")
    with pytest.raises(UserError, match=message):
        prepare.load_imagefolder(root, 8)


def test_unreadable_image_file(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=8)
    locked = root / "a" / "0.png"
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any file whatever its mode: make reading it fail the way it would
        real_read = Path.read_bytes

        def read_bytes(self):
            if self == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real_read(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    try:
        with pytest.raises(UserError, match="bad image a/0.png: PermissionError"):
            prepare.load_imagefolder(root, 8)
        raw = prepare.load_imagefolder(root, 8, on_bad_image="skip")
        assert len(raw.ids) == 5 and "PermissionError" in raw.skipped[0]
    finally:
        locked.chmod(0o644)


def test_unreadable_root_directory(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "imgs", {"a": 2, "b": 2}, size=8)
    if os.geteuid() != 0:
        root.chmod(0o300)  # may enter, may not list
    else:

        def iterdir(self):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "iterdir", iterdir)
    try:
        with pytest.raises(UserError, match="cannot list the folder .Permission denied"):
            prepare.load_imagefolder(root, 8)
    finally:
        root.chmod(0o755)


def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "imgs", {"a": 2, "b": 2}, size=8)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "a" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 > 2x the limit: PIL refuses it
    with pytest.raises(UserError, match="bad image a/huge.png: DecompressionBombError"):
        prepare.load_imagefolder(root, 8)


def test_skip_policy_and_duplicates_are_counted_in_meta_and_validation_report(tmp_path, capsys):
    root = write_image_tree(tmp_path / "imgs", {"a": 8, "b": 8, "c": 8}, size=8)
    (root / "a" / "broken.png").write_bytes(b"junk")
    (root / "b" / "notes.txt").write_text("x")
    (root / "c" / "copy_of_a0.png").write_bytes((root / "a" / "0.png").read_bytes())
    params = imagefolder_params(tmp_path / "params.yaml", root, on_bad_image="skip")
    stage_main("prepare")(["--params", str(params), "--out", str(tmp_path / "prepared")])
    assert "1 image(s) filed under more than one class" in capsys.readouterr().out
    meta = data.load_meta(tmp_path / "prepared")
    assert len(meta["skipped_images"]) == 2 and meta["duplicates_dropped"] == 1
    assert meta["duplicate_label_conflicts"] == ["a/0.png = c/copy_of_a0.png"]
    assert len(data.load_manifest(tmp_path / "prepared")) == 24  # the copy in c/ is gone
    stage_main("validate_data")(
        [
            "--params",
            str(params),
            "--data",
            str(tmp_path / "prepared"),
            "--report",
            str(tmp_path / "dv.json"),
        ]
    )
    report = json.loads((tmp_path / "dv.json").read_text())
    assert report["success"] and len(report["skipped_images"]) == 2
    assert len(report["duplicate_label_conflicts"]) == 1


def test_validation_flags_an_image_with_two_labels(tiny_prepared):
    from resnet_slim.data.validate import validate_manifest

    manifest = data.load_manifest(tiny_prepared)
    twin = manifest.iloc[[0]].assign(id="copy", label=(manifest.label[0] + 1) % 10)
    twin["class_name"] = str(twin.label.iloc[0])
    report = validate_manifest(
        pd.concat([manifest, twin], ignore_index=True),
        [str(d) for d in range(10)],
        min_class_share=0.0,
        max_class_share=1.0,
    )
    assert not report["success"] and any("column=n_labels" in f for f in report["failed"])


def test_cifar10_with_incomplete_files(tmp_path):
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"truncated download")
    with pytest.raises(UserError, match="CIFAR-10 not found or incomplete"):
        prepare.load_cifar10(tmp_path / "cifar", 8)


def _validate(prepared: Path) -> dict:
    from resnet_slim.data.validate import validate_manifest

    return validate_manifest(
        data.load_manifest(prepared), ["0"], min_class_share=0.0, max_class_share=1.0
    )


@pytest.fixture
def prepared_copy(tmp_path, tiny_prepared) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_prepared, tmp_path / "prepared"))


@pytest.mark.parametrize(
    "damage, call, message",
    [
        (
            "train_images.npy:junk",
            lambda d: data.load_split(d, "train"),
            "train: prepared split is corrupt",
        ),
        ("meta.json:[1, 2]", data.load_meta, "metadata lacks \\['class_names'"),
        ("meta.json:{not json", data.load_meta, "metadata is not valid JSON"),
        ("manifest.csv:", data.load_manifest, "manifest.csv: manifest is not a readable CSV"),
        (
            "manifest.csv:id,split\nx,train\n",
            lambda d: _validate(d),
            "manifest lacks column\\(s\\) \\['label'",
        ),
    ],
    ids=["npz", "meta-list", "meta-json", "manifest-empty", "manifest-columns"],
)
def test_damaged_prepared_dataset(prepared_copy, damage, call, message):
    name, _, content = damage.partition(":")
    (prepared_copy / name).write_text(content)
    with pytest.raises(UserError, match=message):
        call(prepared_copy)


# --------------------------------------------------------------------------------------------
# training


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


# --------------------------------------------------------------------------------------------
# model files


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


def test_export_stage_refuses_pickled_checkpoint_and_writes_nothing(
    tmp_path, tiny_model, tiny_prepared
):
    torch.save(tiny_model, tmp_path / "model.pt")
    with pytest.raises(UserError, match="weights_only"):
        stage_main("export")(
            [
                str(tmp_path / "model.pt"),
                str(tmp_path / "m.onnx"),
                "--params",
                str(tiny_params(tmp_path / "params.yaml")),
                "--data",
                str(tiny_prepared),
                "--report",
                str(tmp_path / "parity.json"),
            ]
        )
    assert_not_written(tmp_path / "m.onnx", tmp_path / "parity.json")


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


def test_teacher_cache_problems(tmp_path, tiny_model):
    write_checkpoint(tmp_path / "teacher.pt")
    sha = sha256_file(tmp_path / "teacher.pt")
    torch.save(tiny_model, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="pickled.pt: not a loadable teacher-output cache .refused"):
        distill.load_teacher_cache(tmp_path / "pickled.pt", teacher_sha256=sha, n_images=4)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a teacher-output cache written by the cache_teacher"):
        distill.load_teacher_cache(tmp_path / "list.pt", teacher_sha256=sha, n_images=4)
    distill.save_teacher_cache(
        tmp_path / "cache.pt", {"logits": torch.zeros(4, 10)}, teacher_sha256=sha, n_images=4
    )
    with pytest.raises(
        UserError, match="cache lacks \\['layer3'\\] .distill.feature_stages changed"
    ):
        distill.load_teacher_cache(
            tmp_path / "cache.pt", teacher_sha256=sha, n_images=4, stages=[3]
        )


def _custom_op_onnx(path: Path, *, domain: str = "com.example", ir_version: int = 8) -> Path:
    node = helper.make_node("FancyOp", ["input"], ["logits"], domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )
    model = helper.make_model(
        graph,
        ir_version=ir_version,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
    )
    onnx.save(model, str(path))
    return path


def test_onnx_files_onnxruntime_cannot_load(tmp_path):
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(
        UserError, match="garbage.onnx: onnxruntime cannot load this model: .*Protobuf"
    ):
        export.make_session(tmp_path / "garbage.onnx")
    with pytest.raises(
        UserError, match="onnxruntime cannot load this model: .*com.example:FancyOp"
    ):
        export.make_session(_custom_op_onnx(tmp_path / "custom.onnx"))
    newer = _custom_op_onnx(tmp_path / "newer.onnx", ir_version=onnx.IR_VERSION + 5)
    with pytest.raises(
        UserError, match="cannot load this model: .*Unsupported model IR version"
    ) as err:
        export.make_session(newer)
    assert "onnxruntime_src" not in str(err.value)  # the C++ source location is noise for a user


def test_onnx_with_the_wrong_input_size(tmp_path, tiny_model):
    export.export_onnx(tiny_model, tmp_path / "m16.onnx", image_size=16, opset=17)
    session = export.make_session(tmp_path / "m16.onnx")
    with pytest.raises(UserError, match="model expects 16x16 images but the dataset is 8x8"):
        export.check_input_size(session, 8, tmp_path / "m16.onnx")


def test_export_with_an_opset_torch_cannot_write(tmp_path, tiny_model):
    with pytest.raises(UserError, match="export.opset 99 is newer than this torch can export"):
        export.export_onnx(tiny_model, tmp_path / "m.onnx", image_size=8, opset=99)
    assert_not_written(tmp_path / "m.onnx")


def test_ptq_of_a_missing_fp32_model_writes_nothing(tmp_path):
    calibration = np.zeros((4, 3, 8, 8), np.float32)
    with pytest.raises(UserError, match="none.onnx: ONNX model not found"):
        quant.quantize_static_int8(tmp_path / "none.onnx", tmp_path / "int8.onnx", calibration)
    with pytest.raises(UserError, match="none.onnx: ONNX model not found"):
        quant.quantize_dynamic_int8(tmp_path / "none.onnx", tmp_path / "dyn.onnx")
    assert_not_written(tmp_path / "int8.onnx", tmp_path / "dyn.onnx")


# --------------------------------------------------------------------------------------------
# gate (in-process; the stage runs above cover missing / empty files, NaN and auto)


@pytest.mark.parametrize(
    "bench, code, reason",
    [
        (
            {"models": {**GOOD_BENCH, "rel": {"top1": "97.9", "p50_ms": 1.0, "size_mb": 1.0}}},
            1,
            "metric rel.top1 is missing or not a number ('97.9')",
        ),
        (
            {"models": {**GOOD_BENCH, "rel": {"top1": math.inf, "p50_ms": 1.0, "size_mb": 1.0}}},
            1,
            "metric rel.top1 is inf",
        ),
        ({"models": GOOD_BENCH}, 1, "no benchmark results for model 'rel'"),
        (
            {"models": {**GOOD_BENCH, "rel": {"top1": 98.0, "p50_ms": 0.0, "size_mb": 1.0}}},
            1,
            "metric rel.p50_ms is 0.0, must be > 0",
        ),
        ([GOOD_BENCH], 1, "no benchmark results for model 'teacher'"),
        ("{not json", 2, "benchmark results is not valid JSON"),
    ],
    ids=["string", "inf", "release-absent", "zero-latency", "not-a-mapping", "malformed"],
)
def test_gate_fails_closed(tmp_path, bench, code, reason):
    (tmp_path / "bench.json").write_text(bench if isinstance(bench, str) else json.dumps(bench))
    params = tiny_params(tmp_path / "params.yaml", gate={"release": "rel"})
    args = [
        "--params",
        str(params),
        "--benchmark",
        str(tmp_path / "bench.json"),
        *absent_gate_inputs(tmp_path),
        "--out",
        str(tmp_path / "gate.json"),
    ]
    if code == 1:
        assert stage_main("gate")(args) == 1
    else:
        with pytest.raises(UserError, match=reason):
            stage_main("gate")(args)
    verdict = json.loads((tmp_path / "gate.json").read_text())
    assert verdict["passed"] is False and any(reason in f for f in verdict["failed"]), verdict


# --------------------------------------------------------------------------------------------
# QAT / PTQ calibration


def test_empty_calibration_sets(tmp_path, tiny_model):
    empty = torch.zeros(0, 3, 8, 8)
    with pytest.raises(
        UserError, match="calibration set is empty: the training split has no images"
    ):
        quant.calibration_images(empty, 256, seed=0)
    with pytest.raises(UserError, match="QAT calibration set is empty"):
        qat.calibrate(qat.prepare_qat_model(tiny_model), empty)
    with pytest.raises(UserError, match="PTQ calibration set is empty"):
        qat.eager_ptq_int8(tiny_model, empty)
    export.export_onnx(tiny_model, tmp_path / "fp32.onnx", image_size=8, opset=17)
    with pytest.raises(UserError, match="calibration set is empty"):
        quant.quantize_static_int8(
            tmp_path / "fp32.onnx", tmp_path / "int8.onnx", np.zeros((0, 3, 8, 8), np.float32)
        )
    assert_not_written(tmp_path / "int8.onnx")


def test_ptq_stage_with_an_empty_training_split(prepared_copy, tmp_path, tiny_model):
    np.save(prepared_copy / "train_images.npy", np.zeros((0, 8, 8, 3), np.uint8))
    np.save(prepared_copy / "train_labels.npy", np.zeros(0, np.int64))
    export.export_onnx(tiny_model, tmp_path / "fp32.onnx", image_size=8, opset=17)
    with pytest.raises(UserError, match="calibration set is empty"):
        stage_main("ptq")(
            [
                str(tmp_path / "fp32.onnx"),
                str(tmp_path / "int8.onnx"),
                "--params",
                str(tiny_params(tmp_path / "params.yaml")),
                "--data",
                str(prepared_copy),
            ]
        )
    assert_not_written(tmp_path / "int8.onnx")


# --------------------------------------------------------------------------------------------
# benchmark.models, and benchmark results the gate cannot trace (issue 20; the attacks on a real
# benchmark run, and SIGTERM between its writes, are in tests/test_evidence.py)


@pytest.mark.parametrize(
    "models, message",
    [
        ([], "benchmark.models: Value error, list at least one model to benchmark"),
        (["../teacher"], "a model name is an ONNX file stem"),
        (["teacher", "teacher"], "benchmark.models: Value error, model names must be distinct"),
        ("teacher", "benchmark.models: Input should be a valid list"),
    ],
    ids=["empty", "a-path", "repeated", "not-a-list"],
)
def test_benchmark_models_in_params(tmp_path, models, message):
    with pytest.raises(UserError, match=message):
        load_params(tiny_params(tmp_path / "params.yaml", benchmark={"models": models}))


def test_benchmark_of_a_missing_model_writes_nothing(tmp_path, tiny_prepared):
    params = tiny_params(
        tmp_path / "params.yaml",
        benchmark={"models": ["teacher"], "rounds": 5, "runs_per_round": 1},
    )
    out = tmp_path / "reports"
    with pytest.raises(UserError, match="models/teacher.onnx.*not found"):
        stage_main("benchmark")(
            [
                "--params",
                str(params),
                "--models-dir",
                str(tmp_path / "models"),
                "--data",
                str(tiny_prepared),
                "--out",
                str(out / "b.json"),
                "--table",
                str(out / "b.csv"),
                "--predictions",
                str(out / "p.csv"),
            ]
        )
    assert_not_written(out / "b.json", out / "b.csv", out / "p.csv")


def test_gate_refuses_benchmark_results_it_cannot_trace(tmp_path, tiny_prepared):
    write_json(tmp_path / "bench.json", {"models": GOOD_BENCH})  # numbers without their record
    (tmp_path / "p.csv").write_text("image,label,teacher,student_qat_int8\n0,1,1,1\n")
    params = tiny_params(
        tmp_path / "params.yaml",
        gate={"release": "student_qat_int8", "acc_drop_statistic": "point"},
    )
    assert (
        stage_main("gate")(
            [
                "--params",
                str(params),
                "--benchmark",
                str(tmp_path / "bench.json"),
                "--predictions",
                str(tmp_path / "p.csv"),
                "--data",
                str(tiny_prepared),
                "--seeds",
                str(tmp_path / "none.json"),
                "--out",
                str(tmp_path / "gate.json"),
            ]
        )
        == 1
    )
    verdict = json.loads((tmp_path / "gate.json").read_text())
    evidence = next(c for c in verdict["checks"] if c["name"] == "evidence")
    failed = " ".join(evidence["problems"])
    assert not verdict["passed"] and not evidence["passed"]
    for reason in (
        "1 rows for the 80 test images",
        "bench.json lists no outputs with their sha256",
        "teacher: benchmark.json records no file and sha256",
        "student_qat_int8: benchmark.json records no file and sha256",
        "test split in " + str(tiny_prepared) + " is not the one",
    ):
        assert reason in failed, (reason, failed)


# --------------------------------------------------------------------------------------------
# issue 20, part 2: strict params, file names, environment errors (tests/test_faults.py: signals,
# full and read-only disks; tests/test_params_strict.py: every strict param in-process)


def _duplicate_gate_section(d: Path) -> Path:
    params = tiny_params(d / "params.yaml")
    with params.open("a") as file:  # a second `gate:` appended, as in the issue
        file.write("gate:\n  min_speedup: 0\n")
    return params


def _imagefolder_with(d: Path, bad: bytes, *, class_dir: bool = False) -> Path:
    root = write_image_tree(d / "imgs", {"a": 6, "b": 6}, size=8)
    if class_dir:
        os.rename(bytes(root / "b"), bytes(root) + b"/" + bad)
    else:
        os.rename(bytes(root / "a" / "0.png"), bytes(root / "a") + b"/" + bad)
    return root


STRICT_STAGE_CASES = {  # name: (script, params overrides or a builder, words in the error)
    "duplicate-section": ("prepare.py", _duplicate_gate_section, ["duplicate key 'gate' at lines"]),
    "epochs-true": (
        "train_teacher.py",
        {"teacher": {"epochs": True}},
        ["teacher.epochs: Input should be a valid integer (got True)"],
    ),
    "width-huge": (
        "train_teacher.py",
        {"teacher": {"width": 1_000_000}},
        ["teacher.width: Input should be less than or equal to 256"],
    ),
    "threads-huge": (
        "train_teacher.py",
        {"base": {"threads": 1_000_000}},
        ["base.threads: Input should be less than or equal to 1024"],
    ),
    "seed-too-big": (
        "prepare.py",
        {"base": {"seed": 2**32}},
        ["base.seed: Input should be less than or equal to 4294967295"],
    ),
    "root-empty": (
        "prepare.py",
        {"prepare": {"source": "imagefolder", "root": ""}},
        ["prepare.root: Value error, must not be empty"],
    ),
    "file-name-not-utf8": (
        "prepare.py",
        lambda d: _imagefolder_with(d, b"bad\xff.png"),
        ["a/bad\\xff.png", "not valid UTF-8"],
    ),
    "file-name-newline": (
        "prepare.py",
        lambda d: _imagefolder_with(d, b"two\nlines.png"),
        ["a/two\\nlines.png", "control character"],
    ),
    "class-name-not-utf8": (
        "prepare.py",
        lambda d: _imagefolder_with(d, b"b\xfe", class_dir=True),
        ["class directory 'b\\xfe'", "not valid UTF-8"],
    ),
}


def _strict_case_args(name: str, d: Path, prepared: Path) -> tuple[str, list[str], list[Path]]:
    script, setup, _ = STRICT_STAGE_CASES[name]
    if isinstance(setup, dict):
        params = tiny_params(d / "params.yaml", **setup)
    else:
        made = setup(d)
        params = made if made.suffix == ".yaml" else imagefolder_params(d / "params.yaml", made)
    if script == "prepare.py":
        return script, ["--params", str(params), "--out", str(d / "prepared")], [d / "prepared"]
    out = d / "teacher.pt"
    return (
        script,
        [
            "--params",
            str(params),
            "--data",
            str(prepared),
            "--out",
            str(out),
            "--live",
            str(d / "live"),
        ],
        [out, d / "live" / "summary.json"],
    )


@pytest.fixture(scope="module")
def strict_stage_runs(tmp_path_factory, tiny_prepared):
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {}
        for name in STRICT_STAGE_CASES:
            d = tmp_path_factory.mktemp(f"strict-{name}")
            script, args, outputs = _strict_case_args(name, d, tiny_prepared)
            runs[name] = (outputs, pool.submit(run_script, script, args, d))
        yield runs


@pytest.mark.parametrize("name", list(STRICT_STAGE_CASES))
def test_strict_inputs_fail_the_stage_with_one_line(strict_stage_runs, name):
    outputs, future = strict_stage_runs[name]
    assert_one_line_error(future.result(), 2, *STRICT_STAGE_CASES[name][2])
    assert_not_written(*outputs)


def test_bad_file_names_are_skipped_and_recorded_escaped(tmp_path):
    root = _imagefolder_with(tmp_path, b"two\nlines\xff.png")
    raw = prepare.load_imagefolder(root, 8, on_bad_image="skip")
    assert len(raw.ids) == 11 and all(name.isprintable() for name in raw.ids)
    assert raw.skipped == [
        "a/two\\nlines\\xff.png: ValueError: its name is not valid UTF-8; rename it"
    ]


def _identity_onnx(path: Path) -> Path:
    """A valid ONNX file that is not a classifier: its output is its input image."""
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 8, 8])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "id", [image], [out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _benchmark(tmp_path: Path, prepared: Path, *extra: str) -> list[str]:
    out = tmp_path / "reports"
    return [
        "--params",
        str(tmp_path / "params.yaml"),
        "--models-dir",
        str(tmp_path / "models"),
        "--data",
        str(prepared),
        "--out",
        str(out / "b.json"),
        "--table",
        str(out / "b.csv"),
        "--predictions",
        str(out / "p.csv"),
        *extra,
    ]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("identity", "outputs (80, 3, 8, 8) for 80 test images, not (80, 10) class scores"),
        ("five-classes", "outputs (80, 5) for 80 test images, not (80, 10) class scores"),
        ("torch-results-list", "torch.json: torch_ptq report is a JSON list, not an object"),
        ("targets-list", "targets.json: deployment targets is a JSON list, not an object"),
        (
            "empty-target-predictions",
            "target predictions are missing or not a readable CSV (EmptyDataError)",
        ),
        ("target-predictions-not-classes", "columns ['openvino'] are not whole class numbers"),
    ],
)
def test_benchmark_bad_models_and_reports_write_nothing(tmp_path, tiny_prepared, setup, message):
    (tmp_path / "models").mkdir()
    model = "teacher"
    if setup == "identity":
        _identity_onnx(tmp_path / "models" / "identity.onnx")
        model = "identity"
    else:
        torch.manual_seed(0)
        classes = 5 if setup == "five-classes" else 10
        export.export_onnx(
            build_model(tiny_arch(classes)).eval(),
            tmp_path / "models" / "teacher.onnx",
            image_size=8,
            opset=17,
        )
    tiny_params(
        tmp_path / "params.yaml",
        benchmark={
            "models": [model],
            "warmup": 1,
            "rounds": 5,
            "runs_per_round": 1,
            "all_cores": False,
            "roofline": False,
        },
    )
    extra = []
    if setup == "torch-results-list":
        (tmp_path / "torch.json").write_text("[1, 2]")
        extra = ["--torch-results", str(tmp_path / "torch.json")]
    elif setup == "targets-list":
        (tmp_path / "targets.json").write_text("[]")
        extra = ["--targets", str(tmp_path / "targets.json")]
    elif setup in ("empty-target-predictions", "target-predictions-not-classes"):
        write_json(tmp_path / "targets.json", {"models": {}})
        labels = data.load_split(tiny_prepared, "test").labels.numpy()
        text = (
            ""
            if setup == "empty-target-predictions"
            else pd.DataFrame(
                {"image": range(len(labels)), "label": labels, "openvino": ["x"] * len(labels)}
            ).to_csv(index=False)
        )
        (tmp_path / "tp.csv").write_text(text)
        extra = [
            "--targets",
            str(tmp_path / "targets.json"),
            "--targets-predictions",
            str(tmp_path / "tp.csv"),
        ]
    with pytest.raises(UserError) as raised:
        stage_main("benchmark")(_benchmark(tmp_path, tiny_prepared, *extra))
    assert message in str(raised.value) and "\n" not in str(raised.value)
    out = tmp_path / "reports"
    assert_not_written(out / "b.json", out / "b.csv", out / "p.csv")
