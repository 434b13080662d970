"""The one exception type a user should ever see (a message, never a traceback), and how the
CLI turns any other exception into one line: ``describe_failure`` is that one place."""

from __future__ import annotations

import errno
import os
import re
import tempfile
import time
import traceback
from pathlib import Path


class RecsysError(Exception):
    """A problem with the user's input or environment, explained in plain words.

    The CLI prints ``str(error)`` and exits non-zero; everything else is a bug.
    """


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The gist of a library's exception for a one-line ``RecsysError``: its first line, cut at
    ``limit`` characters (polars and MLflow put whole query plans and stack dumps below it)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


CRASH_LOG_DIR_ENV = "RECSYS_LOG_DIR"  # where a bug's traceback is written (default: temp dir)


def crash_log_dir() -> Path:
    """``$RECSYS_LOG_DIR``, else ``<temp dir>/recsys-logs``: a place that is writable even when
    the working directory is not (a bug report must not fail for the bug's own reason)."""
    configured = os.environ.get(CRASH_LOG_DIR_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "recsys-logs"


def write_crash_log(exc: BaseException, argv: list[str]) -> Path | None:
    """The full traceback of an unexpected exception in a log file; its path, or None if even
    that cannot be written."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        folder = crash_log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{stamp}-{os.getpid()}.log"
        trace = "".join(traceback.format_exception(exc))
        path.write_text(f"command: {' '.join(argv)}\ncwd: {os.getcwd()}\n\n{trace}")
    except OSError:
        return None
    return path


def _os_error_line(exc: OSError) -> str:
    """``PermissionError`` and friends name the path; say what the system said about it."""
    reason = exc.strerror or first_line(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EFBIG:
        reason = "file too large (a file-size limit or a full disk)"
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def describe_failure(exc: BaseException, argv: list[str]) -> tuple[str, int]:
    """The one line and the exit code the CLI reports for any exception that reaches it.

    A ``RecsysError`` is the user's input or environment; an ``OSError`` is the environment (a
    path that cannot be read or written, a full disk); ``MemoryError`` is the machine; anything
    else is a bug: it is said to be one, with the path of a log holding the traceback.
    """
    if isinstance(exc, RecsysError):
        return str(exc), 1
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; outputs written so far are complete, partial ones were discarded", 130
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno is not None):
        return _os_error_line(exc), 1
    os_code = re.search(r"\(os error (\d+)\)", str(exc))  # polars wraps I/O errors so
    if os_code is not None:
        code = int(os_code.group(1))
        reason = _os_error_line(OSError(code, os.strerror(code)))
        return f"{reason}: {first_line(exc, 200)}", 1
    if isinstance(exc, MemoryError):
        return "out of memory; use a smaller config (batch size, layers, n_sample) or free RAM", 1
    log = write_crash_log(exc, argv)
    where = f"the traceback is in {log}" if log else "no log could be written"
    return (
        f"internal error (a bug in recsys, please report it): {type(exc).__name__}: "
        f"{first_line(exc, 200)}; {where}",
        1,
    )
