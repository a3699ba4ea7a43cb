"""`dvc exp run --temp` runs the code of the workspace it was started from,
never another checkout's.

A copy of the library sits on PYTHONPATH as "another checkout" (what an editable install of the
main checkout used to be). The experiment must still import its own copy: the library as changed
in the workspace, and, the reverse, as committed once the workspace change is undone.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, dvc_env

PROBE = """import json
import resnet_slim
from resnet_slim.gate import metrics
json.dump({"marker": getattr(metrics, "MARKER", "unchanged"), "file": resnet_slim.__file__},
          open("probe.json", "w"))
"""

PIPELINE = """stages:
  probe:
    cmd: python -m stages.probe
    deps: [stages/probe.py, resnet_slim/__init__.py, resnet_slim/gate/metrics.py]
    outs:
      - probe.json:
          cache: false
"""


def sh(*args, cwd: Path, env: dict) -> str:
    result = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}"
    return result.stdout


def copy_library(dest: Path, marker: str | None = None) -> None:
    shutil.copytree(
        REPO / "resnet_slim", dest / "resnet_slim", ignore=shutil.ignore_patterns("__pycache__")
    )
    if marker is not None:
        with open(dest / "resnet_slim" / "gate" / "metrics.py", "a") as f:
            f.write(f"\nMARKER = {marker!r}\n")


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    copy_library(repo)
    (repo / "stages").mkdir()
    shutil.copy(REPO / "stages" / "__init__.py", repo / "stages" / "__init__.py")
    (repo / "stages" / "probe.py").write_text(PROBE)
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "params.yaml").write_text("{}\n")
    other = tmp_path / "other_checkout"
    copy_library(other, marker="other checkout")
    env = dvc_env(PYTHONPATH=str(other))
    sh("git", "init", "-q", cwd=repo, env=env)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "probe", cwd=repo, env=env)
    return repo, env


def run_temp_experiment(repo: Path, env: dict, name: str) -> str:
    sh(sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, cwd=repo, env=env)
    ref = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps", cwd=repo, env=env).split()
    ref = [r for r in ref if r.endswith("/" + name)]
    assert len(ref) == 1, ref
    return json.loads(sh("git", "show", f"{ref[0]}:probe.json", cwd=repo, env=env))["marker"]


def test_temp_experiment_runs_the_workspace_library(project):
    repo, env = project
    with open(repo / "resnet_slim" / "gate" / "metrics.py", "a") as f:  # uncommitted change
        f.write("\nMARKER = 'changed in the workspace'\n")
    assert run_temp_experiment(repo, env, "changed") == "changed in the workspace"

    # the reverse: undo the change; the experiment follows the workspace back, not the other copy
    sh("git", "checkout", "--", "resnet_slim/gate/metrics.py", cwd=repo, env=env)
    assert run_temp_experiment(repo, env, "restored") == "unchanged"

    # and the stage run in place (`dvc repro`) uses the workspace's copy too
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo, env=env)
    probe = json.loads((repo / "probe.json").read_text())
    assert probe["marker"] == "unchanged"
    assert Path(probe["file"]).resolve() == (repo / "resnet_slim" / "__init__.py").resolve()
