"""The real pipeline: `dvc repro` on the embedded data in a throw-away copy of this repo, at smoke
size (tests/smoke_params.yaml over params.yaml: every stage runs, on tiny models and data). The
default-size run is the CI workflow's repro job (`make repro`), which also checks its teacher."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from resnet_slim.params import merged
from tests.conftest import REPO, dvc_env

SMOKE_PARAMS = REPO / "tests" / "smoke_params.yaml"

# `make test` (pytest-xdist, --dist loadfile): this file runs on one worker, sharing the module's
# repro, and first (tests/conftest.py), while the other workers take the rest of the suite
pytestmark = pytest.mark.e2e


def sh(*args, cwd, check=True, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args), cwd=cwd, env=env or dvc_env(), capture_output=True, text=True, timeout=1800
    )
    if check and result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{output}")
    return result


def dvc(*args, repo: Path, check=True, env=None) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "dvc", *args, cwd=repo, check=check, env=env)


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    """A fresh clone-like copy (tracked + untracked-not-ignored files, no caches) with the smoke
    params committed as its params.yaml, then `dvc repro`."""
    dest = tmp_path_factory.mktemp("repo") / "resnet-slim"
    files = sh(
        "git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=REPO
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    # committed results of the default run are what this run must reproduce, not inputs to it
    shutil.rmtree(dest / "reports", ignore_errors=True)
    (dest / "dvc.lock").unlink(missing_ok=True)
    params = merged(
        yaml.safe_load((dest / "params.yaml").read_text()), yaml.safe_load(SMOKE_PARAMS.read_text())
    )
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-qm", "copy", cwd=dest)
    # a long run stopped hard: train_teacher is SIGKILLed right after its first epoch's resume
    # checkpoint; the next `dvc repro` continues from it
    from tests.test_faults import child_env

    hooks = dest.parent / "hooks"
    hooks.mkdir()
    hook = child_env(hooks, "resnet_slim.train.resume:save:1:kill:resnet_slim.train.resume")
    # the hook imports the copy's own library (as the resumed run will), not this checkout's
    env = dvc_env(
        PYTHONPATH=f"{hooks / 'hooks'}{os.pathsep}{dest}",
        **{key: hook[key] for key in ("FAULT_AT", "FAULT_MARKER")},
    )
    killed = dvc("repro", "train_teacher", repo=dest, check=False, env=env)
    assert killed.returncode != 0 and list((dest / "models" / ".resume").rglob("*.pt"))
    repro = dvc("repro", repo=dest)
    (dest / "repro.log").write_text(repro.stdout)  # for test_a_killed_stage_resumed_in_repro
    return dest


def dvc_stages(repo: Path) -> set[str]:
    """Every stage name in dvc.yaml, `foreach` ones expanded (`export@teacher`), as in dvc.lock."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return {
        f"{name}@{item}" if "foreach" in stage else name
        for name, stage in stages.items()
        for item in stage.get("foreach", [None])
    }


def test_repro_runs_every_stage_to_a_passing_gate_and_all_reports(pipeline_repo):
    locked = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())["stages"]
    assert set(locked) == dvc_stages(pipeline_repo)  # every stage ran, none was skipped
    smoke = yaml.safe_load((pipeline_repo / "params.yaml").read_text())
    assert smoke["teacher"]["width"] == 16  # the smoke params were in force
    gate = json.loads((pipeline_repo / "reports" / "gate.json").read_text())
    assert gate["passed"], gate["failed"]  # the smoke thresholds pass any working pipeline
    bench = json.loads((pipeline_repo / "reports" / "benchmark.json").read_text())
    # 1-epoch smoke models: the default run's teacher >= 95% is checked in CI's repro job
    assert 0.0 <= bench["models"]["teacher"]["top1"] <= 100.0
    for page in ("report.md", "report.html"):
        assert (pipeline_repo / "reports" / page).is_file()
    lowrank = json.loads((pipeline_repo / "reports" / "lowrank" / "metrics.json").read_text())
    pruned = json.loads((pipeline_repo / "reports" / "prune" / "metrics.json").read_text())
    # the SVD model is sized to the pruned one, and both are benchmarked side by side
    assert lowrank["params"]["lowrank"] <= 1.01 * pruned["params"]["pruned"]
    assert {"lowrank", "lowrank_ptq_int8", "pruned"} <= set(bench["models"])
    validation = json.loads((pipeline_repo / "reports" / "data_validation.json").read_text())
    assert validation["success"]


def test_a_killed_stage_resumed_in_repro(pipeline_repo):
    log = (pipeline_repo / "repro.log").read_text()
    assert "teacher: resumed after epoch 1 from models/.resume/teacher.pt/teacher-rank0.pt" in log
    assert not (pipeline_repo / "models" / ".resume").exists()  # removed when the stage ended
    assert "train_teacher" in yaml.safe_load((pipeline_repo / "dvc.lock").read_text())["stages"]


def test_second_repro_has_nothing_to_do(pipeline_repo):
    out = dvc("repro", repo=pipeline_repo).stdout
    assert "Data and pipelines are up to date" in out
    shown = json.loads(dvc("metrics", "show", "--json", repo=pipeline_repo).stdout)
    files = {path for rev in shown.values() for path in (rev.get("data") or {})}
    assert files == {"reports/metrics.json"}  # one small file, not hundreds of benchmark keys


def test_tightened_gate_fails_the_experiment_with_a_clear_message(pipeline_repo):
    # speed, not accuracy: 1-epoch smoke models sit near chance, so any accuracy bound may pass
    result = dvc("exp", "run", "-S", "gate.min_speedup=1000", repo=pipeline_repo, check=False)
    assert result.returncode != 0
    assert "latency_speedup" in result.stdout + result.stderr
    gate = json.loads((pipeline_repo / "reports" / "gate.json").read_text())
    assert not gate["passed"] and any("latency_speedup" in f for f in gate["failed"])
    assert gate["selection"]["why"] == "no candidate passed every check"
    # what a reviewer sees: a short diff naming every gate check
    diff = dvc("metrics", "diff", "--md", "--all", repo=pipeline_repo).stdout
    rows = [line for line in diff.splitlines() if line.startswith("| reports/metrics.json")]
    assert 0 < len(rows) <= 30, diff  # ~20 headline keys, the speed-ups' CIs, a row per check
    for check in gate["checks"]:
        assert f"checks.{check['name']}.passed" in diff, diff
    sh("git", "checkout", "--", "params.yaml", cwd=pipeline_repo)


def test_remote_round_trip_needs_nothing_rerun(pipeline_repo, tmp_path):
    """push data, models and run-cache to a remote; lose the cache and outputs; pull; repro is a
    no-op."""
    # back to the committed params' outputs (an experiment above changed them)
    dvc("repro", repo=pipeline_repo)
    remote = tmp_path / "remote"
    dvc("remote", "add", "-d", "localremote", str(remote), repo=pipeline_repo)
    dvc("push", "--run-cache", repo=pipeline_repo)
    assert (remote / "files" / "md5").is_dir() and (remote / "runs").is_dir()
    shutil.rmtree(pipeline_repo / ".dvc" / "cache")
    shutil.rmtree(pipeline_repo / "data" / "prepared")
    # models/imported is git-tracked source (where users `dvc add` their checkpoints), not an output
    models = [
        path
        for path in (pipeline_repo / "models").iterdir()
        if path.name not in (".gitignore", "imported")
    ]
    assert any(path.name == "teacher.pt" for path in models)
    for path in models:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    dvc("pull", "--run-cache", repo=pipeline_repo)
    assert all(path.exists() for path in models) and (pipeline_repo / "data" / "prepared").is_dir()
    assert (pipeline_repo / ".dvc" / "cache" / "runs").is_dir()
    out = dvc("repro", repo=pipeline_repo).stdout
    assert "Data and pipelines are up to date" in out, out[-3000:]


def test_queued_sweep_runs_two_at_a_time_and_is_compared(pipeline_repo):
    """`dvc exp run --queue` x2 + `dvc queue start -j 2`; only gate/report rerun; both compared."""
    dvc("repro", repo=pipeline_repo)
    # queued experiments start from the last commit: commit the reproduced run, as a user would
    sh("git", "add", "-A", cwd=pipeline_repo)
    sh("git", "commit", "-qm", "default run", cwd=pipeline_repo)
    # a sweep over the speed target with gate.enforce=false: the failing point is recorded, not
    # aborted (the queue reports Success), and the comparison shows which point passed
    names = {"speedup-0": ("0.0", "True"), "speedup-1000": ("1000.0", "False")}
    for name, (speedup, _) in names.items():
        overrides = ["-S", f"gate.min_speedup={speedup}", "-S", "gate.enforce=false"]
        dvc("exp", "run", "--queue", "-n", name, *overrides, repo=pipeline_repo)
    dvc("queue", "start", "-j", "2", repo=pipeline_repo)
    deadline = time.monotonic() + 900
    while re.search(
        r"\b(Queued|Running)\b", status := dvc("queue", "status", repo=pipeline_repo).stdout
    ):
        if time.monotonic() > deadline:
            dvc("queue", "stop", "--kill", repo=pipeline_repo, check=False)
            raise AssertionError(f"queued experiments still not done after 15 minutes:\n{status}")
        time.sleep(5)
    for name in names:
        assert re.search(rf"{re.escape(name)}\s+.*Success", status), status
        log = dvc("queue", "logs", name, repo=pipeline_repo).stdout
        assert "Running stage 'gate'" in log or "Stage 'gate' is cached" in log, log[-2000:]
        assert "Running stage 'train_teacher'" not in log  # a gate sweep reuses the trained models
    table = sh(sys.executable, "-m", "stages.compare_experiments", "--md", cwd=pipeline_repo).stdout
    header, _, *rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in table.strip().splitlines()
    ]
    found = {row[0]: row for row in rows}
    for name, (speedup, passed) in names.items():
        assert name in found, table
        assert float(found[name][header.index("gate.min_speedup")]) == float(speedup), table
        assert found[name][header.index("gate passed")] == passed, table
        assert found[name][header.index("state")] == "success", table
