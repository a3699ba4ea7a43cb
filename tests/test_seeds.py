"""Seed repeats re-run the right dvc.yaml stages per seed, keep the data split, and feed the
gate."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import GATE_ARGS, REPO, write_params

from resnet_slim.compress.export import export_onnx, make_session
from resnet_slim.data.loader import normalized_split
from resnet_slim.errors import UserError
from resnet_slim.gate import seeds as repeats
from resnet_slim.io import sha256_file
from resnet_slim.measure.bench import top1
from resnet_slim.train.models import build_model, make_arch

# A stand-in "training" stage: a tiny ResNet whose weights depend only on base.seed.
MAKE_MODEL = textwrap.dedent("""
    import argparse, torch, yaml
    from resnet_slim.compress.export import export_onnx
    from resnet_slim.train.models import build_model, make_arch
    parser = argparse.ArgumentParser()
    parser.add_argument("--out"); parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    seed = yaml.safe_load(open("params.yaml"))["base"]["seed"]
    torch.manual_seed(seed)
    arch = make_arch(name="resnet18", num_classes=10, width=args.width, small_input=True)
    model = build_model(arch)
    export_onnx(model.eval(), args.out, image_size=8, opset=17)
""")

PIPELINE = {
    "stages": {
        "prepare": {"cmd": "false", "outs": ["data/prepared"]},  # must never be re-run
        "teacher": {
            "cmd": "python stages/make_model.py --out models/teacher.onnx",
            "deps": ["stages/make_model.py", "data/prepared"],
            "outs": ["models/teacher.onnx"],
        },
        "student": {
            "cmd": "python stages/make_model.py --out models/student.onnx --width 4",
            "deps": ["models/teacher.onnx"],
            "outs": ["models/student.onnx"],
            "metrics": [{"reports/student.json": {"cache": False}}],
        },
        "unrelated": {
            "cmd": "false",
            "deps": ["models/teacher.onnx"],
            "outs": ["models/other.onnx"],
        },
    }
}

# the paths dvc.yaml passes (the stages have no path defaults), relative to the project
SEED_ARGS = [
    "--benchmark",
    "reports/benchmark.json",
    "--data",
    "data/prepared",
    "--out",
    "reports/seeds.json",
]


def test_stages_to_rerun_walks_upstream_and_stops_at_the_data():
    stages = repeats.read_stages_from(PIPELINE)
    assert repeats.stages_to_rerun(stages, ["models/student.onnx"], keep={"prepare"}) == [
        "teacher",
        "student",
    ]
    with pytest.raises(UserError, match="no stage produces 'models/nothing.onnx'"):
        repeats.stages_to_rerun(stages, ["models/nothing.onnx"], keep=set())


def _project(tmp_path: Path, prepared: Path, seeds: list[int]) -> Path:
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "make_model.py").write_text(MAKE_MODEL)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(prepared, target_is_directory=True)
    (tmp_path / "models").mkdir()
    write_params(
        tmp_path / "params.yaml",
        base={"seed": 0, "seeds": seeds},
        gate={"reference": "teacher", "release": "auto", "candidates": ["student"]},
    )
    return tmp_path


def _score(project: Path, prepared: Path, name: str) -> float:
    images, labels = normalized_split(prepared, "test")
    return top1(make_session(project / "models" / f"{name}.onnx"), images, labels)


def _build(project: Path, seed: int, name: str, width: int) -> None:
    """In-process twin of MAKE_MODEL (subprocesses cost seconds of imports each)."""
    torch.manual_seed(seed)
    model = build_model(make_arch(name="resnet18", num_classes=10, width=width, small_input=True))
    export_onnx(model.eval(), project / "models" / f"{name}.onnx", image_size=8, opset=17)


def test_seed_repeats_rerun_the_training_chain_per_seed(tmp_path, tiny_prepared):
    project = _project(tmp_path, tiny_prepared, seeds=[0, 1])
    expected = {}
    for seed in (1, 0):  # what each seed's models score when built directly (0 last: the main run)
        _build(project, seed, "teacher", 8)
        _build(project, seed, "student", 4)
        expected[seed] = {n: _score(project, tiny_prepared, n) for n in ("teacher", "student")}
    assert expected[0] != expected[1], "the stand-in models must differ between seeds"
    (project / "reports").mkdir()
    (project / "reports" / "benchmark.json").write_text(
        json.dumps(
            {
                "models": {
                    n: {
                        "file": f"models/{n}.onnx",
                        "top1": expected[0][n],
                        "sha256": sha256_file(project / "models" / f"{n}.onnx"),
                    }
                    for n in ("teacher", "student")
                }
            }
        )
    )

    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / "seed_repeats.py"), *SEED_ARGS],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((project / "reports" / "seeds.json").read_text())
    assert report["seeds"] == [0, 1] and report["rerun_stages"] == ["teacher", "student"]
    for run in report["runs"]:
        assert run["top1"] == pytest.approx(expected[run["seed"]])
    drops = [expected[s]["teacher"] - expected[s]["student"] for s in (0, 1)]
    assert report["drop_pp"]["student"]["mean"] == pytest.approx(sum(drops) / 2)
    assert report["top1"]["teacher"]["std"] is not None
    assert not list((project / "models").glob(".seed-*")), "scratch workspaces must be removed"

    gate = subprocess.run(
        [sys.executable, str(REPO / "stages" / "gate.py"), *GATE_ARGS],
        cwd=project,
        capture_output=True,
        text=True,
    )
    verdict = json.loads((project / "reports" / "gate.json").read_text())
    accuracy = verdict["checks"][0]
    assert accuracy["basis"] == "seeds" and accuracy["seeds"] == [0, 1], gate.stderr
    assert accuracy["point"] == pytest.approx(sum(drops) / 2)


def _run_with_main_run_scores(project: Path, **top1) -> subprocess.CompletedProcess:
    """seed_repeats in `project` after a (pretend) main run that scored `top1` per model."""
    (project / "reports").mkdir()
    (project / "reports" / "benchmark.json").write_text(
        json.dumps(
            {
                "models": {
                    name: {"file": f"models/{name}.onnx", "top1": value}
                    for name, value in top1.items()
                }
            }
        )
    )
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "seed_repeats.py"), *SEED_ARGS],
        cwd=project,
        capture_output=True,
        text=True,
    )


def test_seed_repeats_off_only_records_the_main_run(tmp_path, tiny_prepared):
    project = _project(tmp_path, tiny_prepared, seeds=[])
    result = _run_with_main_run_scores(project, teacher=90.0, student=89.0)
    assert result.returncode == 0, result.stderr
    report = json.loads((project / "reports" / "seeds.json").read_text())
    assert report["repeats"] is False and report["seeds"] == [0] and report["rerun_stages"] == []
    assert report["drop_pp"]["student"]["mean"] == pytest.approx(1.0)


def test_a_failing_seed_stage_is_one_clear_error_and_leaves_no_scratch(tmp_path, tiny_prepared):
    project = _project(tmp_path, tiny_prepared, seeds=[0, 1])
    (project / "stages" / "make_model.py").write_text("raise SystemExit('error: boom')\n")
    result = _run_with_main_run_scores(project, teacher=90.0, student=89.0)
    assert result.returncode == 2
    assert "seed 1: stage 'teacher' failed (exit 1): error: boom" in result.stderr
    assert not (project / "reports" / "seeds.json").exists()
    assert not list((project / "models").glob(".seed-*"))
