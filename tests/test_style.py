"""One style for the whole tree: ruff's lint rules and formatter, configured in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CODE = ["resnet_slim", "stages", "tests", "benchmarks"]


def ruff() -> str:
    found = Path(sys.executable).parent / "ruff"
    binary = str(found) if found.is_file() else shutil.which("ruff")
    if binary is None:
        pytest.skip("ruff is not installed (it is in requirements.txt: make install)")
    return binary


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_the_code_follows_the_configured_style(command):
    result = subprocess.run([ruff(), *command, *CODE], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def test_the_style_check_fails_on_a_long_line(tmp_path):
    """The configuration is in force: a 101-column line is an error."""
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "long.py").write_text(f"X = {'1' * 97}\n")
    result = subprocess.run(
        [ruff(), "check", "long.py"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1 and "E501" in result.stdout, result.stdout
