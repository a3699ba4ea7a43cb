"""gate.json as its readers see it: one strict schema for the report and the server, and the files
the gate vouched for (release ONNX file, the dataset's meta.json, benchmark.json), by sha256.

Torch- and onnxruntime-free: the report and `serve` read it before loading anything heavy.
A gate.json edited by hand (`"passed": "no"`, `"measured": "abc"`) is refused with one line, never
rendered or served as something it is not; a release file, meta.json or benchmark.json that changed
after the gate judged them is named, so the server never serves what the gate did not see.
"""

from pathlib import Path

from resnet_slim.errors import UserError
from resnet_slim.io import read_json, sha256_file

CHECK_OPS = ("<=", ">=")
VOUCHED = ("release", "meta", "benchmark")  # the files gate.json records under "files"


def _problem(verdict) -> str | None:
    """Why `verdict` is not a gate.json the gate stage could have written, or None."""
    if not isinstance(verdict, dict):
        return "not a JSON object"
    for key in ("passed", "enforce"):
        if not isinstance(verdict.get(key), bool):
            return f"'{key}' is {verdict.get(key)!r}, not true or false"
    if not isinstance(verdict.get("release"), str) or not verdict["release"]:
        return f"'release' is {verdict.get('release')!r}, not a model name"
    if not isinstance(verdict.get("failed"), list) or not all(
        isinstance(f, str) for f in verdict["failed"]
    ):
        return "'failed' is not a list of reasons"
    if verdict["passed"] == bool(verdict["failed"]):
        return f"'passed' is {verdict['passed']} but {len(verdict['failed'])} check(s) failed"
    checks = verdict.get("checks")
    if not isinstance(checks, list):
        return "'checks' is not a list"
    for check in checks:
        if not isinstance(check, dict) or not isinstance(check.get("name"), str):
            return "a check is not an object with a name"
        name = check["name"]
        if not isinstance(check.get("passed"), bool):
            return f"check '{name}': 'passed' is {check.get('passed')!r}, not true or false"
        for key in ("measured", "threshold"):
            value = check.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                return f"check '{name}': '{key}' is {value!r}, not a number"
        if check.get("op") not in CHECK_OPS:
            return f"check '{name}': 'op' is {check.get('op')!r}, not one of {list(CHECK_OPS)}"
    if verdict["passed"] and not all(c["passed"] for c in checks):
        return "'passed' is true but a check failed"
    return None


def read_verdict(path: str | Path) -> dict:
    """gate.json, checked against the schema the gate stage writes; else one UserError line."""
    verdict = read_json(path, what="gate result")
    if (problem := _problem(verdict)) is not None:
        raise UserError(f"{path}: not a gate result the gate stage wrote ({problem}); re-run it")
    return verdict


def file_record(path: str | Path) -> dict:
    return {"path": Path(path).as_posix(), "sha256": sha256_file(path)}


def vouched_files(release_file: str | Path, *, meta: str | Path, benchmark: str | Path) -> dict:
    """What gate.json records under "files": the exact bytes the verdict is about."""
    records = {}
    for name, path in (("release", release_file), ("meta", meta), ("benchmark", benchmark)):
        records[name] = file_record(path) if Path(path).is_file() else None
    return records


def served_file_problems(verdict: dict, root: str | Path) -> list[str]:
    """Each way the files under `root` are not the ones the gate vouched for (empty: they are).

    The release must be `models/<release>.onnx` inside the workspace; each recorded file must exist
    with the recorded sha256."""
    root = Path(root).resolve()
    files = verdict.get("files")
    if not isinstance(files, dict):
        return ["gate.json records no files (written by an older gate stage); re-run the gate"]
    problems = []
    release = files.get("release") if isinstance(files.get("release"), dict) else {}
    expected = f"models/{verdict.get('release')}.onnx"
    if release.get("path") != expected:
        problems.append(f"the release file is {release.get('path')!r}, not {expected!r}")
    for name in VOUCHED:
        record = files.get(name)
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            problems.append(f"gate.json records no {name} file")
            continue
        if "\0" in record["path"]:  # Path.resolve raises on it: a hand-edited record
            problems.append(f"the {name} file {record['path']!r} is not a path")
            continue
        path = (root / record["path"]).resolve()
        if not path.is_relative_to(root):
            problems.append(f"the {name} file {record['path']} is outside the workspace {root}")
        elif not path.is_file():
            problems.append(f"the {name} file {record['path']} is missing")
        elif sha256_file(path) != record.get("sha256"):
            problems.append(
                f"the {name} file {record['path']} is not the one the gate judged (sha256 differs)"
            )
    return problems
