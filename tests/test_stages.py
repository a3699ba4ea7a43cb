"""Stage scripts as a user runs them: exit codes, one-line errors, outputs only on success.

Every stage fails cleanly on a bad input (`STAGE_CASES`, `STRICT_STAGE_CASES`): the stage script as
`dvc repro` runs it, in a subprocess, checked for the exit code, exactly one `error: ...` line on
stderr (no traceback) naming the problem, and no output or `.<name>.tmp-*` leftover. Starting a
stage costs seconds (torch, onnxruntime imports), so all of them start together when this module
starts, two at a time, while the other tests run; each test then only waits for its own result.
The same bad inputs in-process (the library function or the stage's `main()`, checked for the
`UserError` message) are in the test file of the module that raises it.
"""

import errno
import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from resnet_slim.data.loader import load_manifest, load_meta
from resnet_slim.io import write_json
from tests.conftest import (
    GOOD_BENCH,
    REPO,
    absent_gate_inputs,
    assert_not_written,
    assert_one_line_error,
    imagefolder_params,
    imagefolder_with,
    no_temp_files,
    tiny_params,
    write_checkpoint,
    write_image_tree,
    write_params,
)


def run_stage(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prepare_imagefolder_source_end_to_end(tmp_path):
    write_image_tree(tmp_path / "imgs", {"a": 10, "b": 10, "c": 10})
    params = write_params(
        tmp_path / "params.yaml",
        prepare={
            "source": "imagefolder",
            "root": str(tmp_path / "imgs"),
            "image_size": 8,
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
    )
    result = run_stage(
        "prepare.py", "--params", str(params), "--out", str(tmp_path / "prepared"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tmp_path / "prepared")
    assert len(manifest) == 30 and set(manifest.split) == {"train", "val", "test"}
    assert load_meta(tmp_path / "prepared")["class_names"] == ["a", "b", "c"]
    result = run_stage(
        "validate_data.py",
        "--params",
        str(params),
        "--data",
        str(tmp_path / "prepared"),
        "--report",
        str(tmp_path / "dv.json"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "dv.json").read_text())["success"]


def test_prepare_with_bad_root_fails_in_one_line_and_writes_nothing(tmp_path):
    params = write_params(
        tmp_path / "params.yaml", prepare={"source": "imagefolder", "root": str(tmp_path / "x")}
    )
    result = run_stage(
        "prepare.py", "--params", str(params), "--out", str(tmp_path / "prepared"), cwd=tmp_path
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "prepared").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]  # no temp leftovers either


def test_params_typo_stops_a_stage(tmp_path):
    params = write_params(tmp_path / "params.yaml", prepare={"image_sise": 8})
    result = run_stage(
        "prepare.py", "--params", str(params), "--out", str(tmp_path / "p"), cwd=tmp_path
    )
    assert result.returncode == 2 and "prepare.image_sise: unknown key" in result.stderr


@pytest.mark.parametrize("enforce, code", [(True, 1), (False, 0)])
def test_gate_stage_exit_code_follows_enforce(tmp_path, enforce, code):
    write_json(
        tmp_path / "bench.json",
        {
            "models": {
                "teacher": {"top1": 98.0, "p50_ms": 8.0, "size_mb": 44.0},
                "rel": {"top1": 90.0, "p50_ms": 1.0, "size_mb": 4.0},
            }
        },
    )
    params = write_params(tmp_path / "params.yaml", gate={"release": "rel", "enforce": enforce})
    result = run_stage(
        "gate.py",
        "--params",
        str(params),
        "--benchmark",
        str(tmp_path / "bench.json"),
        *absent_gate_inputs(tmp_path),
        "--out",
        str(tmp_path / "gate.json"),
        cwd=tmp_path,
    )
    assert result.returncode == code, result.stderr
    verdict = json.loads((tmp_path / "gate.json").read_text())
    assert (
        not verdict["passed"] and verdict["failed"] and "accuracy_drop_pp" in verdict["failed"][0]
    )


def test_gate_stage_fails_closed_on_malformed_benchmark(tmp_path):
    (tmp_path / "bench.json").write_text("{not json")
    params = write_params(tmp_path / "params.yaml")
    result = run_stage(
        "gate.py",
        "--params",
        str(params),
        "--benchmark",
        str(tmp_path / "bench.json"),
        *absent_gate_inputs(tmp_path),
        "--out",
        str(tmp_path / "gate.json"),
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "not valid JSON" in result.stderr


# --------------------------------------------------------------------------------------------
# every stage fails cleanly on a bad input: STAGE_CASES, run two at a time


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
    """Start every selected stage case now, two at a time, while the other tests here run."""
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


# --------------------------------------------------------------------------------------------
# strict params and bad file names stop the stage (in-process: tests/test_params.py)


def _duplicate_gate_section(d: Path) -> Path:
    params = tiny_params(d / "params.yaml")
    with params.open("a") as file:  # a second `gate:` appended, as in the issue
        file.write("gate:\n  min_speedup: 0\n")
    return params


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
        lambda d: imagefolder_with(d, b"bad\xff.png"),
        ["a/bad\\xff.png", "not valid UTF-8"],
    ),
    "file-name-newline": (
        "prepare.py",
        lambda d: imagefolder_with(d, b"two\nlines.png"),
        ["a/two\\nlines.png", "control character"],
    ),
    "class-name-not-utf8": (
        "prepare.py",
        lambda d: imagefolder_with(d, b"b\xfe", class_dir=True),
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
