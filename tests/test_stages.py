"""Stage scripts as a user runs them: exit codes, one-line errors, outputs only on success."""

import json
import subprocess
import sys

import pytest

from resnet_slim.data.loader import load_manifest, load_meta
from resnet_slim.io import write_json
from tests.conftest import REPO, absent_gate_inputs, write_image_tree, write_params


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
