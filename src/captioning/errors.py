"""How a stage reports a mistake a person can fix: one line on stderr, no traceback.

`run_stage(main)` runs a stage's `main` and turns the project's own user-facing
errors into `error: ...` lines and an exit status: a parameter problem
(`ConfigError`, `section.key = value: allowed ...`) exits 2, a full disk
(`DiskFullError` or any "no space left" OSError, naming the path it was
writing) exits 1. Anything else is a bug and keeps its traceback. Set
CAPTIONING_DEBUG=1 to get the traceback of the handled errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from captioning.atomic_files import DiskFullError, is_disk_full
from captioning.config import ConfigError

DEBUG_ENV = "CAPTIONING_DEBUG"
EXIT_CONFIG = 2
EXIT_DISK_FULL = 1


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def disk_full_message(err: BaseException) -> str:
    """One line naming where the space ran out, from a DiskFullError or a plain ENOSPC."""
    if isinstance(err, DiskFullError):
        return str(err)
    found = err
    while found is not None and not getattr(found, "filename", None):
        found = found.__cause__ or found.__context__
    where = f" writing {found.filename}" if found is not None else ""
    return f"no space left on the device{where}: free some space, then run the stage again"


def user_error(err: BaseException) -> tuple[str, int] | None:
    """(the lines to print, the exit status) for a user-facing error; None for a bug."""
    if isinstance(err, ConfigError):
        return "\n".join(f"error: {line}" for line in str(err).splitlines()), EXIT_CONFIG
    if is_disk_full(err):
        return f"error: {disk_full_message(err)}", EXIT_DISK_FULL
    return None


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's `main`; a user-facing error becomes one line and an exit status."""
    try:
        main()
    except Exception as err:
        handled = user_error(err)
        if handled is None or debugging():
            raise
        message, status = handled
        print(message, file=sys.stderr)
        sys.exit(status)
