"""Faults: SIGTERM at every point of a stage's life, SIGKILL leftovers, a disk that refuses writes.

The fault harness runs the real `train_teacher` stage (tiny data, width 8, one epoch) in a
subprocess and stops it with a real SIGTERM at a chosen point: a `sitecustomize` hook, put on the
child's PYTHONPATH by the test only, wraps one function (`FAULT_AT`), touches a marker file when
that point is reached and waits there; the test then sends SIGTERM, so the signal lands exactly
at that point. Every case checks: exit within 10 s (by unwinding, not by the watchdog, unless
the case makes unwinding hang), exit 130 with one `error:` line and no traceback, no temp
leftovers, and each output either the previous one, byte for byte, or a complete new one.
(How it ended shows in the message: the watchdog's forced exit says so.)

Disk faults use a tmpfs mounted in a private mount namespace (`unshare -m`, root only; skipped
elsewhere): full (ENOSPC) and read-only (EROFS), the real errors, not mocks.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from resnet_slim import errors
from resnet_slim.checkpoints import save_checkpoint
from resnet_slim.errors import FORCED_EXIT, UserError
from resnet_slim.io import atomic_path, write_json
from resnet_slim.train.models import build_model, load_model, make_arch
from tests.conftest import (
    REPO,
    absent_gate_inputs,
    assert_not_written,
    assert_one_line_error,
    no_temp_files,
    prepared_digits,
    stage_main,
    tiny_params,
    write_params,
)

STOP_WITHIN_S = 10.0

HOOK = '''
"""Fault hook of tests/test_faults.py: FAULT_AT = module:attr.path:count:action[:caller]."""
import functools, importlib, os, signal, sys, time

_spec = os.environ.get("FAULT_AT")
if _spec:
    _module, _attr, _count, _action, *_caller = _spec.split(":")
    _marker, _calls = os.environ["FAULT_MARKER"], [0]
    _owner = importlib.import_module(_module)
    *_parents, _name = _attr.split(".")
    for _part in _parents:
        _owner = getattr(_owner, _part)
    _original = getattr(_owner, _name)

    def _arrive(caller):
        with open(_marker + ".part", "w") as marker:
            marker.write(caller)
        os.replace(_marker + ".part", _marker)  # the test sends SIGTERM once this exists
        if _action == "hang":  # a clean-up that never ends and ignores KeyboardInterrupt
            while True:
                try:
                    time.sleep(0.05)
                except KeyboardInterrupt:
                    pass
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the signal lands here, i.e. at this point
            time.sleep(0.01)
            held = sys.modules.get("resnet_slim.errors")
            if held is not None and held._deferred.is_set():
                return  # held until a set of renames is done (errors.signals_deferred): go on

    @functools.wraps(_original)
    def _hooked(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "?")
        if _caller and caller != _caller[0]:
            return _original(*args, **kwargs)
        _calls[0] += 1
        if _calls[0] != int(_count):
            return _original(*args, **kwargs)
        if _action == "before":
            _arrive(caller)
            return _original(*args, **kwargs)
        result = _original(*args, **kwargs)
        if _action == "kill":  # SIGKILL right after the call returned: nothing else runs
            os.kill(os.getpid(), signal.SIGKILL)
        _arrive(caller)
        return result

    setattr(_owner, _name, _hooked)
'''


@dataclass
class Point:
    """Where SIGTERM lands: `hook` is FAULT_AT (None: a fixed delay after start)."""

    hook: str | None
    caller: str | None = None  # the module the hooked call must come from (checked)
    new_set: bool = False  # teacher.pt and the curves are the new run's when the stage stops
    hangs: bool = False  # unwinding blocks: the watchdog ends the process


POINTS = {
    "start-up (imports)": Point(None),
    "DVCLive start-up": Point("dvclive.live:Live._init_studio:1:before", "dvclive.live"),
    "mid-epoch (3rd batch)": Point(
        "torch.nn.functional:cross_entropy:3:before:resnet_slim.train.engine",
        "resnet_slim.train.engine",
    ),
    # the issue-20 hang: DVCLive has made its studio queue but not yet started the worker thread
    # that empties it; `with Live(...)` then ran `Live.end()`, which waited on that queue forever
    # (with the engine of before, this case ends only by the watchdog: FORCED_EXIT)
    "DVCLive queue, no worker yet": Point(
        "threading:Thread.__init__:1:before:dvclive.live", "dvclive.live"
    ),
    "DVCLive end": Point("dvclive.live:Live.end:1:before", "resnet_slim.train.engine"),
    "checkpoint temp written": Point(
        "torch:save:1:after:resnet_slim.checkpoints", "resnet_slim.checkpoints"
    ),
    # the curves were written to a staging folder; summary.json (recording the checkpoint's
    # sha256) goes into it, then checkpoint and curves are renamed into place with the signal
    # held (io.replace_together): the old set whole, or the new set whole
    # (the io module's first rename is the epoch's resume checkpoint: resnet_slim/train/resume.py)
    "summary.json written": Point("os:replace:2:before:resnet_slim.io", "resnet_slim.io"),
    "checkpoint and curves renamed": Point(
        "os:replace:3:before:resnet_slim.io", "resnet_slim.io", new_set=True
    ),
    "clean-up hangs (watchdog)": Point(
        "torch:save:1:hang:resnet_slim.checkpoints", "resnet_slim.checkpoints", hangs=True
    ),
}


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory) -> Path:
    """Digits at 8 px, 12 per class: a few batches of 16 per epoch."""
    return prepared_digits(tmp_path_factory.mktemp("faults"), per_class=12, held_out=0.25)


def tiny_teacher_params(path: Path) -> Path:
    return write_params(
        path, teacher={"width": 8, "epochs": 1, "batch_size": 16, "warmup_epochs": 0}
    )


def seed_old_outputs(workdir: Path) -> dict[Path, str]:
    """Outputs of an earlier run, to check they survive intact; {path: sha256}."""
    checkpoint, summary = workdir / "models" / "teacher.pt", workdir / "live" / "summary.json"
    torch.manual_seed(1)
    arch = make_arch(name="resnet18", num_classes=10, width=8, small_input=True)
    save_checkpoint(
        checkpoint, model=build_model(arch), arch=arch, params={}, metrics={"old": True}
    )
    write_json(summary, {"old": True})
    return {path: sha256(path) for path in (checkpoint, summary)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_command(workdir: Path, prepared: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stages.train_teacher",
        "--params",
        str(tiny_teacher_params(workdir / "params.yaml")),
        "--data",
        str(prepared),
        "--out",
        str(workdir / "models" / "teacher.pt"),
        "--live",
        str(workdir / "live"),
    ]


def child_env(workdir: Path, hook: str | None) -> dict:
    hooks = workdir / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOK)
    env = {
        **os.environ,
        "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}",
        "FAULT_MARKER": str(workdir / "marker"),
    }
    env.pop("FAULT_AT", None)
    if hook:
        env["FAULT_AT"] = hook
    return env


@dataclass
class Stopped:
    returncode: int
    stderr: str
    seconds: float  # from SIGTERM to exit
    caller: str  # the module the hooked call came from ("" without a hook)


def run_and_stop(workdir: Path, prepared: Path, point: Point, sig=signal.SIGTERM) -> Stopped:
    """Start the stage, wait until it reaches `point`, send `sig`, wait for it to exit."""
    marker = workdir / "marker"
    proc = subprocess.Popen(
        stage_command(workdir, prepared),
        cwd=workdir,
        env=child_env(workdir, point.hook),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if point.hook is None:
            time.sleep(0.3)
        else:
            deadline = time.monotonic() + 240
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if not marker.exists():
                stderr = proc.stderr.read()[-2000:] if proc.poll() is not None else ""
                raise AssertionError(f"never reached {point.hook}: {proc.poll()} {stderr}")
        started = time.monotonic()
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_WITHIN_S + 5)
        except subprocess.TimeoutExpired:
            pass
        seconds = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    caller = marker.read_text() if marker.exists() else ""
    return Stopped(proc.returncode, proc.stderr.read(), seconds, caller)


def temp_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp-*"))


def check_outputs(workdir: Path, old: dict[Path, str], *, new_set: bool) -> None:
    checkpoint, summary = workdir / "models" / "teacher.pt", workdir / "live" / "summary.json"
    if new_set:  # replaced whole: loadable, this run's, and its summary records its sha256
        assert sha256(checkpoint) != old[checkpoint]
        assert load_model(checkpoint)[1]["metrics"].get("old") is None
        recorded = json.loads(summary.read_text())["outputs"]["checkpoint"]["sha256"]
        assert recorded == sha256(checkpoint)
    else:
        assert sha256(checkpoint) == old[checkpoint], "the previous checkpoint was changed"
        assert sha256(summary) == old[summary], "the previous summary.json was changed"
        # no curves of the stopped run beside the previous checkpoint
        assert [p.name for p in (workdir / "live").rglob("*")] == ["summary.json"]
    for path in (workdir / "live").rglob("*.json"):  # DVCLive's own files: never torn JSON
        json.loads(path.read_text())
    assert temp_leftovers(workdir) == []


def check_stopped(name: str, point: Point, stopped: Stopped) -> None:
    stderr = stopped.stderr.strip()
    assert stopped.seconds < STOP_WITHIN_S, f"{name}: {stopped.seconds:.1f} s: {stderr[-2000:]}"
    if point.hook is None and stopped.returncode == -signal.SIGTERM:
        return  # SIGTERM before the stage set its handler: the default action, nothing written
    assert stopped.returncode == 130, (name, stopped.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    # ended by unwinding (nothing blocked on the way out), or by the watchdog if the case hangs;
    # (a stage that writes a set may say which members it had replaced: io.InterruptedWrite)
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), stderr[-2000:]
    assert (lines[0] == f"error: {FORCED_EXIT}") == point.hangs, stderr[-2000:]
    if point.caller:
        assert stopped.caller == point.caller, f"{name}: the hook fired in {stopped.caller}"


@pytest.fixture(scope="module")
def sigterm_runs(tmp_path_factory, small_prepared):
    """Every point at once, two stages at a time (each is seconds of imports)."""

    def one(name: str):
        workdir = tmp_path_factory.mktemp("sigterm")
        old = seed_old_outputs(workdir)
        return workdir, old, run_and_stop(workdir, small_prepared, POINTS[name])

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(one, name) for name in POINTS}
        yield futures


@pytest.mark.parametrize("name", list(POINTS))
def test_sigterm_ends_the_stage_cleanly_wherever_it_lands(sigterm_runs, name):
    workdir, old, stopped = sigterm_runs[name].result()
    point = POINTS[name]
    check_stopped(name, point, stopped)
    check_outputs(workdir, old, new_set=point.new_set)


def test_sigterm_during_a_long_call_into_c_ends_by_the_watchdog(tmp_path):
    # Python runs signal handlers between bytecodes only; here the main thread sits in one C
    # call (system() waits for its child, retrying on EINTR) with the GIL released. The watchdog,
    # woken through the signal wakeup fd, still ends the stage after the grace period.
    script = (
        "import ctypes\nfrom resnet_slim.errors import run_stage\n"
        "def main():\n    print('ready', flush=True)\n"
        "    ctypes.CDLL(None).system(b'exec sleep 9 >/dev/null 2>&1')\n"
        "raise SystemExit(run_stage(main))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.2)  # into system()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=STOP_WITHIN_S + 5)
        seconds = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and seconds < 8, (proc.returncode, seconds, stderr)
    assert stderr == f"error: {FORCED_EXIT}\n"


def test_sigkill_leftovers_are_ignored_and_removed_by_the_next_run(tmp_path, small_prepared):
    old = seed_old_outputs(tmp_path)
    stopped = run_and_stop(
        tmp_path,
        small_prepared,
        Point("torch:save:1:hang:resnet_slim.checkpoints"),
        sig=signal.SIGKILL,
    )
    assert stopped.returncode == -signal.SIGKILL
    leftovers = temp_leftovers(tmp_path)  # the curves' staging folder and the checkpoint temp
    pid = leftovers[-1].rsplit("-", 1)[1]
    assert leftovers == [f".live.tmp-{pid}-staging", f"models/.teacher.pt.tmp-{pid}"], leftovers
    assert sha256(tmp_path / "models" / "teacher.pt") == old[tmp_path / "models" / "teacher.pt"]
    # git and DVC ignore them (.gitignore / .dvcignore)
    for leftover in leftovers:
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", f"models/{Path(leftover).name}"],
            cwd=REPO,
            capture_output=True,
        )
        assert ignored.returncode == 0, leftover
    assert ".*.tmp-*" in (REPO / ".dvcignore").read_text().splitlines()
    # the next run (the same command, in-process: imports are paid already) removes it
    from stages.train_teacher import main

    main(stage_command(tmp_path, small_prepared)[3:])
    assert temp_leftovers(tmp_path) == []
    assert load_model(tmp_path / "models" / "teacher.pt")[1]["metrics"].get("old") is None


def test_leftovers_of_live_processes_are_kept(tmp_path):
    # A temp path of a process still running is its write in progress: never removed.
    out = tmp_path / "result.json"
    live = tmp_path / f".result.json.tmp-{os.getppid()}"
    dead = tmp_path / f".result.json.tmp-{_dead_pid()}"
    dead_dir = tmp_path / f".result.json.tmp-{_dead_pid()}-old"
    live.write_text("{}")
    dead.write_text("{")
    dead_dir.mkdir()
    (dead_dir / "x").write_text("x")
    other = tmp_path / f".other.json.tmp-{_dead_pid()}"  # another output's: left to its writer
    other.write_text("{")
    write_json(out, {"ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other.name])


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_directory_outputs_are_swapped_old_intact_if_the_second_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("old")
    real_replace = os.replace

    def fail_second(src, dst):
        if Path(src).name.startswith(".prepared.tmp-") and not str(src).endswith("-old"):
            raise KeyboardInterrupt  # SIGTERM between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "a.txt").read_text() == "old" and temp_leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# the machine refuses the write: ENOSPC, EROFS (a real tmpfs), EACCES (simulated: root ignores it)


def _can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces")


def run_on_small_disk(
    command: list[str], disk: Path, *, read_only: bool, cwd: Path
) -> subprocess.CompletedProcess:
    """`command` with a 64 KiB tmpfs at `disk` (read-only if asked), private to the command."""
    disk.mkdir(parents=True, exist_ok=True)
    remount = f"mount -o remount,ro {disk} && " if read_only else ""
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {disk} && {remount}exec {' '.join(map(_quote, command))}"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@needs_mount
@pytest.mark.parametrize(
    "on_disk, read_only, reason",
    [
        # the first epoch's resume checkpoint beside it (resnet_slim/train/resume.py): a full disk
        # stops the run after one epoch, not after all of them
        ("--out", False, "No space left on device"),
        ("--live", True, "Read-only file system"),  # DVCLive's directory, at start-up
    ],
)
def test_train_teacher_on_a_full_or_read_only_disk(
    tmp_path, small_prepared, on_disk, read_only, reason
):
    disk = tmp_path / "disk"
    command = stage_command(tmp_path, small_prepared)
    target = disk / ("teacher.pt" if on_disk == "--out" else "live")
    command[command.index(on_disk) + 1] = str(target)
    result = run_on_small_disk(command, disk, read_only=read_only, cwd=tmp_path)
    written = disk / ".resume" / "teacher.pt" / "teacher-rank0.pt" if on_disk == "--out" else target
    assert_one_line_error(result, 2, str(written), reason)
    assert not (tmp_path / "models" / "teacher.pt").exists()  # --live fails before training
    assert temp_leftovers(tmp_path) == []


@needs_mount
@pytest.mark.parametrize(
    "read_only, reason", [(False, "No space left on device"), (True, "Read-only file system")]
)
def test_prepare_on_a_full_or_read_only_disk(tmp_path, read_only, reason):
    params = write_params(tmp_path / "params.yaml", prepare={"image_size": 16})
    disk = tmp_path / "disk"
    result = run_on_small_disk(
        [
            sys.executable,
            "-m",
            "stages.prepare",
            "--params",
            str(params),
            "--out",
            str(disk / "prepared"),
        ],
        disk,
        read_only=read_only,
        cwd=tmp_path,
    )
    assert_one_line_error(result, 2, str(disk / "prepared"), reason)


@needs_mount
def test_gate_on_a_read_only_disk(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    (tmp_path / "bench.json").write_text("{}")
    disk = tmp_path / "disk"
    result = run_on_small_disk(
        [
            sys.executable,
            "-m",
            "stages.gate",
            "--params",
            str(params),
            "--benchmark",
            str(tmp_path / "bench.json"),
            *absent_gate_inputs(tmp_path),
            "--out",
            str(disk / "reports" / "gate.json"),
        ],
        disk,
        read_only=True,
        cwd=tmp_path,
    )
    # the gate records even a failed verdict (here: an empty benchmark), so it must say it cannot
    assert_one_line_error(result, 2, str(disk / "reports" / "gate.json"), "Read-only file system")


@pytest.mark.parametrize("number", [errno.EACCES, errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_write_refused_is_a_user_error_naming_the_output(tmp_path, monkeypatch, number):
    out = tmp_path / "reports" / "result.json"

    def refuse(self, *args, **kwargs):
        raise OSError(number, os.strerror(number), str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(UserError) as caught:
        write_json(out, {"a": 1})
    assert str(caught.value) == f"{out}: cannot write ({os.strerror(number)}); left as it was"
    assert not out.exists() and temp_leftovers(tmp_path) == []


@pytest.fixture
def restore_signals(fresh_signal_state):
    """run_stage installs stage signal handlers; give pytest its own back afterwards."""
    saved = {
        number: signal.getsignal(number)
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)
    }
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)
    signal.set_wakeup_fd(-1)


def test_run_stage_turns_a_refused_write_anywhere_into_one_line(capsys, restore_signals):
    def main():  # e.g. DVCLive writing its metrics file, outside atomic_path
        raise PermissionError(errno.EACCES, "Permission denied", "reports/teacher/metrics.json")

    assert errors.run_stage(main) == 2
    assert capsys.readouterr().err == (
        "error: reports/teacher/metrics.json: cannot access (Permission denied)\n"
    )


def test_run_stage_keeps_a_message_with_newlines_on_one_line(capsys, restore_signals):
    def main():
        raise UserError("bad image a/evil\nerror: injected.png: name")

    assert errors.run_stage(main) == 2
    assert capsys.readouterr().err == "error: bad image a/evil\\nerror: injected.png: name\n"


FORCED_EXIT_WITH_WORKERS = """
import multiprocessing, signal, time
from resnet_slim.errors import run_stage

def decode_forever():  # like prepare's decoding pool: a daemon, SIGTERM left at its default
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(600)

def main():
    worker = multiprocessing.get_context("fork").Process(target=decode_forever, daemon=True)
    worker.start()  # inherits stdout/stderr
    try:
        print("started", flush=True)
        time.sleep(600)
    finally:
        time.sleep(600)  # a clean-up that hangs: the watchdog must end the stage

raise SystemExit(run_stage(main))
"""


def test_forced_exit_ends_the_stages_worker_processes_too(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", FORCED_EXIT_WITH_WORKERS],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(signal.SIGTERM)
    # EOF on the pipes only once no process holds them: a live worker would block this
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "clean-up did not finish" in stderr


def test_sigterm_mid_training_leaves_no_output_and_a_rerun_completes(tmp_path, tiny_prepared):
    params = tiny_params(tmp_path / "params.yaml", teacher={"epochs": 500})
    out = tmp_path / "models" / "teacher.pt"
    args = [
        "--params",
        str(params),
        "--data",
        str(tiny_prepared),
        "--out",
        str(out),
        "--live",
        str(tmp_path / "live"),
    ]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "stages" / "train_teacher.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(240, proc.kill)  # readline() below has no timeout of its own
    watchdog.start()
    try:
        first = proc.stdout.readline()  # "teacher epoch 1/500: ..." (printed with flush)
        assert first.startswith("teacher epoch 1/500"), (first, proc.stderr.read()[-2000:])
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip() == "error: interrupted; no outputs were written"
    assert_not_written(out, tmp_path / "live" / "summary.json")
    assert no_temp_files(tmp_path) == []
    # the same command again (one epoch, to keep the test short) completes over what was left
    stage_main("train_teacher")(["--params", str(tiny_params(tmp_path / "again.yaml")), *args[2:]])
    assert load_model(out)[1]["arch"]["width"] == 8
    assert no_temp_files(tmp_path) == []
