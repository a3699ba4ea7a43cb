"""Atomic file writes (checkpoints: resnet_slim/checkpoints.py).

Every output goes to a temp path beside its destination and is renamed into place only when
complete, so a crash, Ctrl-C or SIGTERM never leaves a half-written file for DVC to cache.
"""

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from resnet_slim.errors import WRITE_ERRNOS, UserError, signals_deferred

# Temp paths of this process's atomic writes still open: a forced exit after SIGTERM removes them
# (resnet_slim/errors.py). A SIGKILL leaves them; the next write of the same output removes them.
_pending: set[Path] = set()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path (file or directory) that replaces `path` only if the block succeeds.

    The temp path is `.<name>.tmp-<pid>` beside `path` (ignored by git and DVC). A directory is
    swapped by two renames; should the second fail, the old directory is put back. A full disk,
    read-only file system or missing write permission is a UserError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_paths(path)
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise UserError(f"{path}: cannot write ({err.strerror}); left as it was") from None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    _pending.add(tmp)
    try:
        yield tmp
        _swap_into_place(tmp, path)
    except Exception as err:
        reason = _write_refused(err, path.parent)
        if reason is None:
            raise
        raise UserError(f"{path}: cannot write ({reason}); left as it was") from None
    finally:
        _pending.discard(tmp)
        _remove(tmp)


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not (path.is_dir() and not path.is_symlink()):
        os.replace(tmp, path)  # atomic for files, and for a directory where nothing was
        return
    # os.replace cannot replace a non-empty directory: move the old one aside first. (Killed
    # between the renames, the old one stays aside as a leftover the next run removes.)
    old = path.with_name(f"{tmp.name}-old")
    _remove(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)  # old outputs intact rather than none
        raise
    _remove(old)


def _write_refused(err: Exception, directory: Path) -> str | None:
    """What the machine said when refusing a write, or None when `err` is something else."""
    if isinstance(err, UserError):
        return None
    if isinstance(err, OSError):
        return err.strerror if err.errno in WRITE_ERRNOS else None
    if not isinstance(err, RuntimeError):
        return None
    # torch.save writes from C++ and raises RuntimeError ("file write failed") without an errno:
    # ask the file system what is wrong with the directory.
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return "Read-only file system"
    if stats.f_bavail * stats.f_frsize < 1 << 20:
        return "No space left on device"
    if not os.access(directory, os.W_OK):
        return "Permission denied"
    return None


def remove_stale_temp_paths(path: Path) -> None:
    """Remove `.<name>.tmp-<pid>` leftovers of `path` whose process is gone (SIGKILL, crash)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)(-old|-trash|-staging)?")
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found and int(found[1]) != os.getpid() and not _process_alive(int(found[1])):
            _remove(Path(entry.path))


def remove_pending_temp_paths() -> None:
    """Remove this process's open temp paths (the forced exit after SIGTERM calls this)."""
    for tmp in list(_pending):
        try:
            # renamed first, so a write still finishing in the main thread cannot move a
            # half-deleted directory into place
            trash = tmp.with_name(f"{tmp.name}-trash")
            os.replace(tmp, trash)
            _remove(trash)
        except OSError:
            pass  # gone already, or the file system refuses: the next run removes it


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    # Clean-up must not replace the error being reported (on a read-only file system, say); a
    # temp path it cannot remove is ignored by git and DVC and removed by the next run.
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise


def finite_number(value) -> float | None:
    """A finite float, or None for a missing, non-numeric (bool included), NaN or infinite value.

    The one check every reader of measured numbers uses (report, plots, serve, experiments, JSON
    writes): a number that is not a measurement shows as missing, never as a fake value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _finite_or_none(obj):
    # JSON has no NaN: write null so readers (the gate) see "missing", never a fake number.
    if isinstance(obj, float):
        return finite_number(obj)
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite_or_none(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a 5,000-digit number, nesting
        raise UserError(f"{path}: {what} is not valid JSON ({str(err)[:200]})") from None
    except OSError as err:  # permissions, I/O errors
        raise UserError(f"{path}: cannot read {what} ({err.strerror or err})") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks: model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InterruptedWrite(KeyboardInterrupt):
    """Ctrl-C / SIGTERM part-way through `write_together`; the message says what was replaced."""


def _temp_beside(path: Path) -> Path:
    """The temp path a member of a set is written to first (removed by the signal clean-up)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_paths(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    _pending.add(tmp)
    return tmp


def _write_member(path: Path, tmp: Path, write: Callable[[Path], None], outcome: str) -> None:
    try:
        write(tmp)
    except Exception as err:  # a full / read-only disk: one line, nothing replaced
        reason = _write_refused(err, path.parent)
        if reason is None:
            raise
        raise UserError(f"{path}: cannot write ({reason}); {outcome}") from None


def replace_together(members: dict[str | Path, Callable[[Path], None]]) -> list[Path]:
    """Replace a set of outputs (files or directories) as one: all old or all new.

    `members` is {path: write}; `write(temp_path)` writes one member beside its destination. Only
    when every member is written in full are they moved into place, with SIGTERM / Ctrl-C held
    until the last rename (a signal then stops the stage after the set is whole, and says so).
    A SIGKILL between two renames can still mix the sets: where a reader must be able to tell,
    record the members' hashes (`write_together`). Returns the paths written.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in members.items():
            path = Path(path)
            staged.append((path, _temp_beside(path)))
            _write_member(path, staged[-1][1], write, "no outputs were written")
        with signals_deferred() as interrupted:
            for path, tmp in staged:
                _swap_into_place(tmp, path)
        if interrupted.is_set():
            names = ", ".join(str(path) for path, _ in staged)
            raise InterruptedWrite(f"interrupted after writing all of {names}")
    finally:
        for _, tmp in staged:
            _pending.discard(tmp)
            _remove(tmp)
    return [path for path, _ in staged]


@contextmanager
def staging_dir(path: str | Path) -> Iterator[Path]:
    """A fresh directory beside `path` for outputs written over a long run (live training
    curves), moved into place later with `replace_together`; removed if the run stops first."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}-staging")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_paths(path)
        _remove(staging)
        staging.mkdir()
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise UserError(f"{path}: cannot write ({err.strerror}); left as it was") from None
    _pending.add(staging)
    try:
        yield staging
    finally:
        _pending.discard(staging)
        _remove(staging)


def write_together(
    members: dict[str, tuple[str | Path, Callable[[Path], None]]],
    *,
    record: str | Path,
    content: dict,
) -> list[Path]:
    """Replace a set of outputs so that a reader can tell a whole set from a torn one.

    `members` is {role: (path, write)}; `write(temp_path)` writes one member. Every member is
    first written in full beside its destination (a failure there replaces nothing); then the
    members are renamed into place and `record`, a JSON file holding `content` plus
    {"outputs": {role: {"path", "sha256"}}}, is written last. A crash or signal between the
    renames leaves the previous record, whose hashes no longer match the replaced members, so a
    reader that checks them (`check_together`) refuses the set rather than mixing old and new.
    Returns the paths written, the record last.
    """
    staged: list[tuple[str, Path, Path]] = []
    try:
        for role, (path, write) in members.items():
            path = Path(path)
            staged.append((role, path, _temp_beside(path)))
            _write_member(path, staged[-1][2], write, "left as it was")
        outputs = {
            role: {"path": str(path), "sha256": sha256_file(tmp)} for role, path, tmp in staged
        }
        _rename_then_record([(path, tmp) for _, path, tmp in staged], record, content, outputs)
    finally:
        for _, _, tmp in staged:
            _pending.discard(tmp)
            _remove(tmp)
    return [path for _, path, _ in staged] + [Path(record)]


def _rename_then_record(
    staged: list[tuple[Path, Path]], record: str | Path, content: dict, outputs: dict
) -> None:
    """Rename each written member into place, then write `record` last (`write_together`).

    Stopped once a member is replaced, it raises `_torn_set`'s error, which says what was."""
    replaced: list[Path] = []
    try:
        for path, tmp in staged:
            os.replace(tmp, path)
            replaced.append(path)
        write_json(record, {**content, "outputs": outputs})
    except (KeyboardInterrupt, OSError, UserError) as err:
        if not replaced:
            raise
        raise _torn_set(err, replaced, record, outputs) from None


def _torn_set(
    err: BaseException, replaced: list[Path], record: str | Path, outputs: dict
) -> BaseException:
    """The error for a set stopped part-way: which members were replaced, and whether `record`
    (whose hashes readers check) still lists the previous set."""
    names = ", ".join(map(str, replaced))
    if _lists(record, outputs):  # the signal landed after the record's own rename
        return InterruptedWrite(f"interrupted after writing all of {names} and {record}")
    what = (
        f"replaced {names} but not {record}, which still records the previous set, so "
        f"readers refuse these outputs until the stage re-runs"
    )
    if isinstance(err, KeyboardInterrupt):
        return InterruptedWrite(f"interrupted: {what}")
    reason = str(err) if isinstance(err, UserError) else f"{err.filename or record}: {err.strerror}"
    # atomic_path's refusal says "no outputs were written": here some were, `what` says which
    return UserError(f"{reason.split('; no outputs were written')[0]}; {what}")


def check_together(content: dict, *, record: str | Path) -> list[str]:
    """Why the set that `record` (already read as `content`) lists is not whole; [] if it is.

    Each member must exist with the sha256 the record lists (see `write_together`).
    """
    outputs = content.get("outputs") if isinstance(content, dict) else None
    if not isinstance(outputs, dict) or not outputs:
        return [
            f"{record} lists no outputs with their sha256 (written by an older or interrupted "
            f"run); re-run the stage that writes it"
        ]
    problems = []
    for role, member in outputs.items():
        path = member.get("path") if isinstance(member, dict) else None
        if not isinstance(path, str) or not isinstance(member.get("sha256"), str):
            problems.append(f"{record}: output '{role}' has no path and sha256")
        elif not Path(path).is_file():
            problems.append(f"{path} ({role}) is missing")
        elif sha256_file(path) != member["sha256"]:
            problems.append(
                f"{path} is not the {role} file {record} was written with (sha256 "
                f"differs: a stale or torn write); re-run the stage"
            )
    return problems


def _lists(record: str | Path, outputs: dict) -> bool:
    try:
        return json.loads(Path(record).read_text()).get("outputs") == outputs
    except (OSError, ValueError, AttributeError):
        return False
