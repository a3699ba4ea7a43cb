"""The real pipeline: `dvc repro` on the embedded data in a throw-away copy of this repo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def sh(*args, cwd, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    """A fresh clone-like copy (tracked + untracked-not-ignored files, no caches), then `dvc repro`."""
    dest = tmp_path_factory.mktemp("repo") / "resnet-slim"
    files = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    # committed results of the default run are what this run must reproduce, not inputs to it
    shutil.rmtree(dest / "reports", ignore_errors=True)
    (dest / "dvc.lock").unlink(missing_ok=True)
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-qm", "copy", cwd=dest)
    sh(sys.executable, "-m", "dvc", "repro", cwd=dest)
    return dest


def test_repro_produces_a_passing_gate_and_all_reports(pipeline_repo):
    gate = json.loads((pipeline_repo / "reports" / "gate.json").read_text())
    assert gate["passed"], gate["failed"]
    bench = json.loads((pipeline_repo / "reports" / "benchmark.json").read_text())
    assert bench["models"]["teacher"]["top1"] >= 95.0  # digits: the teacher must be good
    validation = json.loads((pipeline_repo / "reports" / "data_validation.json").read_text())
    assert validation["success"]
    assert (pipeline_repo / "dvc.lock").is_file()


def test_second_repro_has_nothing_to_do(pipeline_repo):
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=pipeline_repo).stdout
    assert "Data and pipelines are up to date" in out
    shown = sh(sys.executable, "-m", "dvc", "metrics", "show", "--json", cwd=pipeline_repo).stdout
    assert "benchmark.json" in shown and "gate.json" in shown


def test_tightened_gate_fails_the_experiment_with_a_clear_message(pipeline_repo):
    # (a max_acc_drop_pp of -1 can still pass here: on digits the release beats the teacher)
    result = sh(sys.executable, "-m", "dvc", "exp", "run", "-S", "gate.min_speedup=1000",
                cwd=pipeline_repo, check=False)
    assert result.returncode != 0
    assert "latency_speedup" in result.stdout + result.stderr
    gate = json.loads((pipeline_repo / "reports" / "gate.json").read_text())
    assert not gate["passed"] and any("latency_speedup" in f for f in gate["failed"])
    assert gate["selection"]["why"] == "no candidate passed every check"
    sh("git", "checkout", "--", "params.yaml", cwd=pipeline_repo)
    relaxed = sh(sys.executable, "-m", "dvc", "exp", "run", "-S", "gate.min_speedup=1000",
                 "-S", "gate.enforce=false", cwd=pipeline_repo, check=False)
    assert relaxed.returncode == 0, relaxed.stderr[-2000:]  # sweeps record failures, exit 0
    assert not json.loads((pipeline_repo / "reports" / "gate.json").read_text())["passed"]
    sh("git", "checkout", "--", "params.yaml", cwd=pipeline_repo)
