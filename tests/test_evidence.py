"""The evidence chain: the gate judges only numbers that trace back to the files on disk.

One real benchmark run (two tiny ONNX models on the tiny digits split) is copied into each test,
which then forges, cuts, swaps or half-writes one piece of evidence, as the issue-20 probe did,
and checks that the gate fails closed naming it. The benchmark's outputs are replaced together:
a SIGTERM between its writes leaves the old set or a set the gate refuses.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from resnet_slim import io
from resnet_slim.compress.export import export_onnx
from resnet_slim.errors import UserError
from resnet_slim.io import check_together, sha256_file, write_json, write_together
from resnet_slim.train.models import build_model, make_arch
from tests.conftest import GATE_ARGS, GOOD_BENCH, REPO, stage_main, tiny_params, write_params

# Loose thresholds: these tests are about the evidence, not about how good the models are.
GATE = {
    "release": "release",
    "reference": "teacher",
    "candidates": [],
    "max_acc_drop_pp": 100.0,
    "acc_drop_statistic": "point",
    "min_speedup": 0.0,
    "max_size_ratio": 10.0,
    "enforce": True,
}
BENCH = {
    "warmup": 1,
    "rounds": 5,
    "runs_per_round": 1,
    "throughput_batch": 8,
    "all_cores": False,
    "roofline": False,
    "bootstrap_resamples": 200,
}
BENCH_ARGS = [
    "--params",
    "params.yaml",
    "--models-dir",
    "models",
    "--data",
    "data/prepared",
    "--out",
    "reports/benchmark.json",
    "--table",
    "reports/benchmark.csv",
    "--predictions",
    "reports/predictions.csv",
]


def tiny_onnx(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_model(
        make_arch(name="resnet18", num_classes=10, width=8, small_input=True)
    ).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, path, image_size=8, opset=17)


def params(root: Path, *, base=None, models=("teacher", "release"), **gate) -> Path:
    return write_params(
        root / "params.yaml",
        base={"seed": 0, "seeds": [], **(base or {})},
        benchmark={**BENCH, "models": list(models)},
        gate={**GATE, **gate},
    )


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_prepared) -> Path:
    """A repo-shaped run directory after the benchmark stage: models/, data/prepared/, reports/."""
    from stages.benchmark import main

    root = tmp_path_factory.mktemp("measured")
    shutil.copytree(tiny_prepared, root / "data" / "prepared")
    tiny_onnx(root / "models" / "teacher.onnx", seed=0)
    tiny_onnx(root / "models" / "release.onnx", seed=1)
    params(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert main(BENCH_ARGS) == 0
    return root


@pytest.fixture
def run(measured, tmp_path, monkeypatch) -> Path:
    """A private copy of the measured run, as the current directory (paths in it are relative)."""
    root = Path(shutil.copytree(measured, tmp_path / "run"))
    monkeypatch.chdir(root)
    return root


def gate(root: Path, *extra: str) -> dict:
    from stages.gate import main

    main([*GATE_ARGS, *extra])
    return json.loads((root / "reports" / "gate.json").read_text())


def refused(verdict: dict, *words: str) -> str:
    """The gate failed, with every word in one of its `failed` lines; returns all of them."""
    failed = " | ".join(verdict["failed"])
    assert not verdict["passed"], verdict
    for word in words:
        assert word in failed, f"{word!r} not in {failed!r}"
    return failed


def bench_json(root: Path) -> dict:
    return json.loads((root / "reports" / "benchmark.json").read_text())


def edit_predictions(root: Path, change, *, reseal: bool = True) -> None:
    """Change predictions.csv; with `reseal`, also its sha256 in benchmark.json (a careful
    forger)."""
    path = root / "reports" / "predictions.csv"
    table = change(pd.read_csv(path, dtype={"image": str}))
    table.to_csv(path, index=False)
    if reseal:
        bench = bench_json(root)
        bench["outputs"]["predictions"]["sha256"] = sha256_file(path)
        write_json(root / "reports" / "benchmark.json", bench)


# --------------------------------------------------------------------------------------------
# what the benchmark records, and the consistent case


def test_benchmark_records_the_evidence(run):
    bench, manifest = bench_json(run), pd.read_csv(run / "data/prepared/manifest.csv", dtype=str)
    for name in ("teacher", "release"):
        assert bench["models"][name]["file"] == f"models/{name}.onnx"
        assert bench["models"][name]["sha256"] == sha256_file(run / "models" / f"{name}.onnx")
    assert bench["test_split"]["sha256"] == {
        "manifest.csv": sha256_file(run / "data/prepared/manifest.csv"),
        **{
            name: sha256_file(run / "data/prepared" / name)
            for name in ("test_images.npy", "test_labels.npy", "meta.json")
        },
    }
    predictions = pd.read_csv(run / "reports/predictions.csv", dtype={"image": str})
    test = manifest[manifest.split == "test"]
    assert predictions["image"].tolist() == test["id"].tolist()  # the manifest's ids, in order
    assert predictions["label"].tolist() == test["label"].astype(int).tolist()
    assert set(bench["outputs"]) == {"predictions", "table"}
    assert check_together(bench, record="reports/benchmark.json") == []


def test_consistent_evidence_passes(run):
    verdict = gate(run)
    assert verdict["passed"], verdict["failed"]
    evidence = next(c for c in verdict["checks"] if c["name"] == "evidence")
    assert evidence["passed"] and evidence["problems"] == [] and verdict["evidence"]["n_test"] == 80
    assert verdict["notes"] == []


def test_gate_writes_its_verdict_and_headline_metrics_together(run):
    verdict = gate(run, "--metrics", "reports/metrics.json")
    assert verdict["passed"] and check_together(verdict, record="reports/gate.json") == []
    assert verdict["outputs"]["metrics"]["sha256"] == sha256_file(run / "reports/metrics.json")
    metrics = json.loads((run / "reports/metrics.json").read_text())
    assert metrics["passed"] and metrics["release"] == "release"
    assert metrics["checks"]["evidence"] == {"passed": True, "measured": 0}


# --------------------------------------------------------------------------------------------
# the attacks of issue 20, each failing closed


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: pd.concat([t] * 10), ["800 rows for the 80 test images (720 repeated"]),
        (lambda t: t.iloc[:8], ["8 rows for the 80 test images (0 repeated, 72 missing"]),
        (
            lambda t: t.assign(label=t["label"] + 100),
            ["80 of 80 labels differ from the manifest's"],
        ),
        (
            lambda t: t.assign(image=[f"digits/{i}" for i in range(len(t))]),
            ["not in the test split"],
        ),
    ],
    ids=["repeated-10x", "cut-to-a-tenth", "labels-plus-100", "ids-of-other-images"],
)
def test_predictions_that_do_not_cover_the_test_split_are_refused(run, change, words):
    edit_predictions(run, change)
    failed = refused(gate(run), "evidence:", *words)
    assert "accuracy_drop_pp: per-image predictions not used" in failed  # not judged on them either


def test_predictions_replaced_behind_the_benchmark_are_refused(run):
    edit_predictions(run, lambda t: t.iloc[::-1], reseal=False)  # same rows, other bytes
    refused(
        gate(run),
        "predictions.csv is not the predictions file reports/benchmark.json was written with",
    )


def test_edited_top1_that_the_predictions_do_not_give_is_refused(run):
    bench = bench_json(run)
    bench["models"]["release"]["top1"] = bench["models"]["teacher"]["top1"] - 5.0
    write_json(run / "reports" / "benchmark.json", bench)
    refused(gate(run), "release: benchmark.json says top-1")


@pytest.mark.parametrize(
    "edits, words",
    [
        ({("release", "top1"): 150.0}, ["metric release.top1 is 150, outside [0, 100]"]),
        ({("teacher", "top1"): -50.0}, ["metric teacher.top1 is -50, outside [0, 100]"]),
        ({("release", "top1"): 1e308}, ["metric release.top1 is 1e+308, outside [0, 100]"]),
        ({("teacher", "top1"): -1e308}, ["metric teacher.top1 is -1e+308, outside [0, 100]"]),
        (
            {("release", "p50_ms"): 1e-308, ("teacher", "p50_ms"): 1e308},
            ["metric teacher.p50_ms is 1e+308, outside [1e-06, 1e+07]"],
        ),
        (
            {("release", "peak_rss_mb"): -1.0, ("teacher", "top1_ci_high"): 1e308},
            [
                "release: peak_rss_mb -1.0 is not a measurement",
                "teacher: top1_ci_high 1e+308 is not a",
            ],
        ),
    ],
    ids=[
        "top1-150",
        "top1-minus-50",
        "top1-1e308",
        "top1-minus-1e308",
        "p50-1e-308-vs-1e308",
        "other-metrics",
    ],
)
def test_out_of_range_metrics_are_refused(run, edits, words):
    bench = bench_json(run)
    for (model, key), value in edits.items():
        bench["models"][model][key] = value
    write_json(run / "reports" / "benchmark.json", bench)
    verdict = gate(run)
    refused(verdict, *words)
    assert all(c["measured"] is not None or not c["passed"] for c in verdict["checks"])


def test_model_file_changed_or_missing_is_refused(run):
    tiny_onnx(run / "models" / "release.onnx", seed=7)
    refused(gate(run), "release: models/release.onnx changed since it was benchmarked")
    (run / "models" / "teacher.onnx").unlink()
    refused(gate(run), "teacher: models/teacher.onnx is missing")


def test_another_test_split_is_refused(run):
    manifest = run / "data/prepared/manifest.csv"
    manifest.write_text(manifest.read_text().replace(",test,", ",val,", 1))
    refused(
        gate(run),
        "is not the one reports/benchmark.json was measured on",
        "80 rows for the 79 test images (0 repeated, 0 missing, 1 not in the test split",
    )


def test_benchmark_json_without_evidence_is_refused(run):
    bench = bench_json(run)  # as the benchmark wrote it before the evidence chain existed
    for key in ("outputs", "test_split"):
        bench.pop(key)
    for row in bench["models"].values():
        row.pop("sha256")
    write_json(run / "reports" / "benchmark.json", bench)
    refused(
        gate(run),
        "lists no outputs with their sha256",
        "records no file and sha256",
        "sha256 of manifest.csv/test_images.npy/test_labels.npy/meta.json differs or is not "
        "recorded",
    )


# --------------------------------------------------------------------------------------------
# seed repeats: used only when asked for and about these very models


def seeds_file(root: Path, *, seeds=(0, 1, 2), drops=(-10.0, -10.5, -9.5), fresh=True) -> None:
    """A seeds.json in stages/seed_repeats.py's shape whose per-seed drops say what we like."""
    bench = bench_json(root)
    models = {
        n: {
            "file": bench["models"][n]["file"],
            "sha256": bench["models"][n]["sha256"] if fresh else "0" * 64,
        }
        for n in ("teacher", "release")
    }
    runs = [
        {"seed": s, "top1": {"teacher": 50.0, "release": 50.0 - d}}
        for s, d in zip(seeds, drops, strict=True)
    ]
    write_json(
        root / "reports" / "seeds.json",
        {
            "seeds": list(seeds),
            "models": list(models),
            "runs": runs,
            "benchmark_models": models,
            "test_split": bench["test_split"],
        },
    )


# upper_ci with a threshold only a release 5+ pp better than the teacher passes: the paired
# bootstrap of this run fails it; the seeds above (release 10 pp better) would pass it.
STRICT = {"acc_drop_statistic": "upper_ci", "max_acc_drop_pp": -5.0}


def test_stale_seeds_are_ignored_when_base_seeds_asks_for_none(run):
    seeds_file(run)
    params(run, **STRICT)  # base.seeds: []
    verdict = gate(run)
    accuracy = next(c for c in verdict["checks"] if c["name"] == "accuracy_drop_pp")
    assert accuracy["basis"] == "paired bootstrap over test images"
    refused(verdict, "accuracy_drop_pp")
    assert verdict["notes"] == ["seed repeats not used: base.seeds asks for one seed ([0])"]


def test_matching_seeds_are_used_when_asked_for(run):
    seeds_file(run)
    params(run, base={"seeds": [0, 1, 2]}, **STRICT)
    verdict = gate(run)
    assert verdict["passed"], verdict["failed"]
    assert next(c for c in verdict["checks"] if c["name"] == "accuracy_drop_pp")["basis"] == "seeds"


@pytest.mark.parametrize(
    "seeds, fresh, split, note",
    [
        (
            (0, 1, 2),
            False,
            None,
            "they were not run for benchmark.json's model files of ['teacher', 'release']",
        ),
        ((0, 1), True, None, "they cover seeds [0, 1], base.seeds asks for [0, 1, 2]"),
        ((0, 1, 2), True, {"sha256": {}}, "they were run on another test split"),
    ],
    ids=["other-model-files", "other-seeds", "other-test-split"],
)
def test_seeds_for_other_models_or_seeds_fail_the_gate_when_asked_for(
    run, seeds, fresh, split, note
):
    """Evidence asked for is evidence required: base.seeds asks for repeats, so seed repeats
    that do not match fail the evidence check, even where one run alone would pass."""
    seeds_file(run, seeds=seeds, drops=(-10.0, -10.5, -9.5)[: len(seeds)], fresh=fresh)
    if split is not None:
        record = json.loads((run / "reports/seeds.json").read_text())
        write_json(run / "reports/seeds.json", {**record, "test_split": split})
    params(run, base={"seeds": [0, 1, 2]})  # the loose gate: one run would pass it
    verdict = gate(run)
    refused(verdict, "evidence: seed repeats not used", note, "evidence asked for")
    assert verdict["notes"] == []


def test_missing_seeds_fail_the_gate_when_asked_for(run):
    params(run, base={"seeds": [0, 1]})
    verdict = gate(run, "--seeds", "reports/no_such_seeds.json")
    refused(verdict, "base.seeds asks for [0, 1] but none were found")


# --------------------------------------------------------------------------------------------
# the chain reaches past the benchmark's own files: meta.json, the models re-scored, serving


def test_meta_json_is_part_of_the_test_split_record(run):
    meta_path = run / "data/prepared/meta.json"
    meta = json.loads(meta_path.read_text())
    write_json(meta_path, {**meta, "class_names": meta["class_names"][::-1]})
    refused(gate(run), "is not the one reports/benchmark.json was measured on", "meta.json")


def test_the_gate_rescores_the_models_instead_of_trusting_their_predictions(run):
    """A careful forger rewrites the release's predictions as the labels, its top-1 as 100 % and
    every recorded hash to match: only running the file again shows it."""
    edit_predictions(run, lambda t: t.assign(release=t["label"]))
    bench = bench_json(run)
    bench["models"]["release"]["top1"] = 100.0
    write_json(run / "reports" / "benchmark.json", bench)
    failed = refused(gate(run), "release: re-scored on the test split, models/release.onnx")
    assert "gives another class than the predictions file on" in failed


def test_gate_json_vouches_for_the_files_it_judged(run):
    from resnet_slim.gate.verdict import read_verdict, served_file_problems

    verdict = gate(run)
    assert verdict["passed"], verdict["failed"]
    assert read_verdict(run / "reports" / "gate.json") == verdict
    assert verdict["files"]["release"]["path"] == "models/release.onnx"
    assert verdict["files"]["meta"]["path"] == "data/prepared/meta.json"
    assert served_file_problems(verdict, run) == []
    shutil.copy(run / "models" / "teacher.onnx", run / "models" / "release.onnx")
    meta = run / "data/prepared/meta.json"
    meta.write_text(meta.read_text().replace("[", "[ ", 1))
    assert served_file_problems(verdict, run) == [
        "the release file models/release.onnx is not the one the gate judged (sha256 differs)",
        "the meta file data/prepared/meta.json is not the one the gate judged (sha256 differs)",
    ]
    outside = {**verdict["files"]["release"], "path": "../release.onnx"}
    problems = served_file_problems(
        {**verdict, "files": {**verdict["files"], "release": outside}}, run
    )
    assert problems[0] == "the release file is '../release.onnx', not 'models/release.onnx'"
    assert "is outside the workspace" in problems[1]


# --------------------------------------------------------------------------------------------
# outputs replaced together or not at all


def _writer(text: str):
    return lambda tmp: tmp.write_text(text)


def _write_set(d: Path, version: str) -> list[Path]:
    return write_together(
        {"a": (d / "a.csv", _writer(f"a {version}")), "b": (d / "b.csv", _writer(f"b {version}"))},
        record=d / "record.json",
        content={"version": version},
    )


def test_write_together_records_every_member(tmp_path):
    assert _write_set(tmp_path, "old") == [
        tmp_path / "a.csv",
        tmp_path / "b.csv",
        tmp_path / "record.json",
    ]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["version"] == "old" and check_together(record, record="record.json") == []
    assert record["outputs"]["b"] == {
        "path": str(tmp_path / "b.csv"),
        "sha256": sha256_file(tmp_path / "b.csv"),
    }


def _interrupt_on_replace(monkeypatch, call: int) -> None:
    """SIGTERM this process at the `call`-th os.replace of write_together (0: before the first)."""
    real, calls = os.replace, []

    def replace(src, dst):
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(dst)
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@pytest.fixture
def sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt, as under run_stage; the old handler is put back after."""
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    yield
    signal.signal(signal.SIGTERM, old)


def test_sigterm_before_any_rename_leaves_the_old_set(tmp_path, monkeypatch, sigterm_interrupts):
    _write_set(tmp_path, "old")
    _interrupt_on_replace(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt) as raised:
        _write_set(tmp_path, "new")
    assert not isinstance(raised.value, io.InterruptedWrite)  # nothing written: the plain message
    assert (tmp_path / "a.csv").read_text() == "a old" and (
        tmp_path / "b.csv"
    ).read_text() == "b old"
    record = json.loads((tmp_path / "record.json").read_text())
    assert check_together(record, record="record.json") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "record.json"]


@pytest.mark.parametrize("call, replaced", [(1, ["a.csv"]), (2, ["a.csv", "b.csv"])])
def test_sigterm_between_renames_is_refused_and_said(
    tmp_path, monkeypatch, sigterm_interrupts, call, replaced
):
    _write_set(tmp_path, "old")
    _interrupt_on_replace(monkeypatch, call)
    with pytest.raises(io.InterruptedWrite) as raised:
        _write_set(tmp_path, "new")
    names = ", ".join(str(tmp_path / n) for n in replaced)
    assert str(raised.value).startswith(
        f"interrupted: replaced {names} but not {tmp_path / 'record.json'}"
    )
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["version"] == "old"
    problems = check_together(record, record="record.json")
    assert len(problems) == len(replaced) and all("sha256 differs" in p for p in problems)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "record.json"]


def test_a_failing_member_replaces_nothing(tmp_path):
    _write_set(tmp_path, "old")

    def broken(tmp):
        raise UserError("cannot render the table")

    with pytest.raises(UserError, match="cannot render"):
        write_together(
            {"a": (tmp_path / "a.csv", _writer("a new")), "b": (tmp_path / "b.csv", broken)},
            record=tmp_path / "record.json",
            content={"version": "new"},
        )
    assert (tmp_path / "a.csv").read_text() == "a old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "record.json"]


# The benchmark stage as dvc runs it, SIGTERMed at its n-th rename (0: before the first one).
KILLED_AT_RENAME = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
real, calls = os.replace, []
def replace(src, dst):  # counts the stage's own renames: a library's cache write is not one
    if "reports" in str(dst):
        if len(calls) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(dst)
    return real(src, dst)
os.replace = replace
from resnet_slim.errors import run_stage
from stages.benchmark import main
sys.exit(run_stage(lambda: main(sys.argv[3:])))
"""


@pytest.mark.parametrize(
    "rename, message, gate_passes",
    [
        (0, "error: interrupted; no outputs were written", True),
        (
            2,
            "error: interrupted: replaced reports/predictions.csv, reports/benchmark.csv but not "
            "reports/benchmark.json, which still records the previous set, so readers refuse these "
            "outputs until the stage re-runs",
            False,
        ),
    ],
    ids=["before-any-rename", "before-the-record"],
)
def test_sigterm_during_the_benchmark_writes(run, rename, message, gate_passes):
    params(run, models=("release", "teacher"))  # other column order: new predictions.csv bytes
    result = subprocess.run(
        [sys.executable, "-c", KILLED_AT_RENAME, str(REPO), str(rename), *BENCH_ARGS],
        cwd=run,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 130 and errors == [message], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (run / "reports").iterdir()) == [
        "benchmark.csv",
        "benchmark.json",
        "predictions.csv",
    ]  # no temp files left
    params(run)
    verdict = gate(run)
    if gate_passes:  # the old set, whole
        assert verdict["passed"], verdict["failed"]
    else:
        refused(
            verdict,
            "reports/predictions.csv is not the predictions file "
            "reports/benchmark.json was written with",
            "reports/benchmark.csv is not the table file",
        )


def test_gate_stage_refusal_is_one_error_line(run):
    edit_predictions(run, lambda t: pd.concat([t] * 10))
    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / "gate.py"), *GATE_ARGS],
        cwd=run,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert (
        lines[0].startswith("error: gate: release 'release' FAILED") and "720 repeated" in lines[0]
    )


# --------------------------------------------------------------------------------------------
# benchmark numbers without their record (no run at all)


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
