"""One error type for everything a user can get wrong, and the stage entry point that prints it.

A stage script calls `run_stage(main)`: a `UserError`, or the machine refusing a write (disk
full, read-only file system, no permission), becomes one line on stderr and exit code 2, so
`dvc repro` stops with a readable message instead of a traceback.

SIGTERM / Ctrl-C unwind the stage like KeyboardInterrupt, so atomic writers delete their temp
files (resnet_slim/io.py). Unwinding is given SIGNAL_GRACE_S seconds: should it block (a library
waiting on a thread that never started, as DVCLive's `Live.end()` could), the process removes the
temp paths still open and exits anyway, and the kernel ends it a few seconds after that if even
that thread cannot run.
"""

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# The machine, not the input, refused a write: the user frees space or fixes the mount or rights.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
SIGNAL_GRACE_S = 5.0  # seconds from SIGTERM to a forced exit; stages must end within 10 s
INTERRUPTED = "interrupted; no outputs were written"
FORCED_EXIT = (
    f"interrupted, and the clean-up did not finish within {SIGNAL_GRACE_S:g} s, so the "
    f"stage was ended (its temp files removed); no outputs were written"
)


class UserError(Exception):
    """A bad input (params, data, model file, metric) that the user can fix."""


def one_line(text: str) -> str:
    """`text` escaped onto one line: a newline in a file name must not start a second line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def write_refused(err: OSError) -> str:
    """The message for an OSError in WRITE_ERRNOS: the path and what the system said."""
    where = f"{err.filename}: " if err.filename else ""
    reason = err.strerror or errno.errorcode.get(err.errno, str(err))
    # permission errors may come from reading an input as well
    verb = "cannot access" if err.errno in (errno.EACCES, errno.EPERM) else "cannot write"
    return f"{where}{verb} ({reason})"


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_watchdog_armed = threading.Event()
_interrupting = threading.Event()  # KeyboardInterrupt raised once already
_finished = threading.Event()  # run_stage has printed its last line


def _force_exit() -> None:
    io_module = sys.modules.get("resnet_slim.io")  # imported only if the stage writes files
    if io_module is not None:
        io_module.remove_pending_temp_paths()  # the next run would remove them too (by pid)
    if "multiprocessing" in sys.modules:
        # worker processes (prepare's decoders) skip the atexit that would end them: end them
        # here, or they outlive the stage and hold its stdout/stderr open (dvc waits on them)
        for child in sys.modules["multiprocessing"].active_children():
            child.terminate()
    if not _finished.is_set():  # else run_stage has said how it ended; only exiting hangs
        sys.stderr.write(f"error: {FORCED_EXIT}\n")
        sys.stderr.flush()
    os._exit(130)


def _arm_watchdog() -> None:
    if _watchdog_armed.is_set():
        return
    _watchdog_armed.set()
    timer = threading.Timer(SIGNAL_GRACE_S, _force_exit)
    timer.daemon = True
    timer.start()
    # Last resort, outside Python: SIGALRM's default action ends the process even if no Python
    # thread can run any more (a temp path left then is removed by the next run, see io.py).
    signal.alarm(int(SIGNAL_GRACE_S) + 3)


def _watch_signals(read_fd: int) -> None:
    # Python runs signal handlers only between bytecodes of the main thread, which may be inside
    # one long C call (a conv, onnxruntime); the C-level handler writes the signal number to the
    # wakeup fd at once, so this thread arms the watchdog even then.
    while True:
        received = os.read(read_fd, 64)
        if any(number in _STOP_SIGNALS for number in received):
            _arm_watchdog()


_deferring = threading.Event()  # inside signals_deferred(): a stop signal waits for its end
_deferred = threading.Event()  # one arrived meanwhile


def _on_signal(signum, frame):
    _arm_watchdog()
    if _interrupting.is_set() or _finished.is_set():
        return  # unwinding or exiting already: a second signal must not abort the clean-up
    if _deferring.is_set():
        _deferred.set()
        return
    _interrupting.set()
    raise KeyboardInterrupt


@contextmanager
def signals_deferred() -> Iterator[threading.Event]:
    """Hold SIGTERM / Ctrl-C until the block ends (a few renames that must all happen or none);
    the yielded event is set if one arrived, and the caller then stops as the signal asked."""
    _deferred.clear()
    _deferring.set()
    try:
        yield _deferred
    finally:
        _deferring.clear()
        if _deferred.is_set():
            _interrupting.set()


def install_signal_handlers() -> None:
    """SIGTERM and Ctrl-C unwind as KeyboardInterrupt, with the forced exit above as a backstop.

    Once per process, from the main thread (a stage's entry point)."""
    if signal.getsignal(signal.SIGTERM) is _on_signal:
        return
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(
        target=_watch_signals, args=(read_fd,), daemon=True, name="signal-watchdog"
    ).start()
    for number in _STOP_SIGNALS:
        signal.signal(number, _on_signal)


def run_stage(main: Callable[[], int | None]) -> int:
    install_signal_handlers()
    try:
        return main() or 0
    except UserError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {one_line(write_refused(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a writer may say what it had replaced (io.InterruptedWrite)
        print(f"error: {one_line(str(err)) or INTERRUPTED}", file=sys.stderr)
        if _interrupting.is_set():  # a real signal: skip the interpreter's teardown, which takes
            _finished.set()  # 1-5 s with torch loaded; every temp path is gone, nothing is left
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    finally:
        _finished.set()
