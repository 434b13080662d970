"""Atomic writes: an artifact is either complete or absent, never half-written.

Every file goes to a temporary sibling first and is renamed into place; a directory of outputs
is built in a temporary sibling directory and swapped in with renames, so a crash or an error
midway leaves the previous good output untouched. A temporary name carries its writer's PID,
so the next write removes what a killed writer left (``remove_stale``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys.core.errors import RecsysError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale(target: Path) -> None:
    """Remove the temporary siblings of ``target`` that a killed run left (``kill -9`` skips
    every ``finally``): those whose writer's PID, in the name, is no longer running."""
    for leftover in Path(target).parent.glob(f".{Path(target).name}.*-*"):
        pid = leftover.name.removeprefix(f".{Path(target).name}.").split("-", 1)[0]
        stale = leftover.suffix in (".tmp", ".old") and pid.isdigit() and int(pid) != os.getpid()
        if stale and not _alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    prefix = f".{target.name}.{os.getpid()}-"
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``target`` as a whole.

    The old directory is moved aside before the new one is renamed in and removed only after,
    so at every instant ``target`` is either the old complete output or the new one.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise RecsysError(f"{target}: is a file, not a folder; move it away and run again")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    prefix = f".{target.name}.{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
