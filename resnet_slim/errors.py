"""One error type for everything a user can get wrong, and the stage entry point that prints it.

A stage script calls `run_stage(main)`: a `UserError` becomes one line on stderr and exit code 2,
so `dvc repro` stops with a readable message instead of a traceback.
"""

import signal
import sys
from typing import Callable


class UserError(Exception):
    """A bad input (params, data, model file, metric) that the user can fix."""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_stage(main: Callable[[], int | None]) -> int:
    # SIGTERM (dvc/CI cancelling us) unwinds like Ctrl-C, so atomic writers delete their temp files.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return main() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no outputs were written", file=sys.stderr)
        return 130
