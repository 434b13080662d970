"""Fused C++ kernels for CPU training (``train.kernels``) and the live ranker's int4 pass,
built on first use.

Several parts of a step are many cheap passes over memory in torch ops: Adagrad with momentum
(for item rows also a gather and a scatter of their state), BPR-max with its gradient (~20 passes
over the (B, C) score matrix), the GRU cell's element-wise work and its backward, and dropout
masks. ``kernels.cpp`` does each in one or a few passes; the arithmetic is that of
``recsys.model.optimizer``, ``recsys.model.losses`` and ``recsys.model.gru4rec``, which stay the
reference and the fallback (docs/benchmarks.md has the timings). The module is compiled with the local C++
compiler through ``torch.utils.cpp_extension`` into a cache keyed by the source, torch and Python
versions, so the ~30 s build happens once per machine. Where it cannot be built, ``auto`` falls
back to torch ops with a note. ``kernels_int4.cpp`` holds the int4 catalogue pass
(``recsys.quantized.Int4Pass``), which the serving layer hands to the ranker
(``ranking_kernels``); without it the ranker uses torch's int4 kernel. ``kernels_readout.cpp``
holds the repeat readout's likelihood and gradient (``recsys.training.readout_loss``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from recsys.core.errors import RecsysError

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("kernels.cpp", "kernels_int4.cpp", "kernels_readout.cpp")
)
NAME = "recsys_kernels"


def build_directory() -> Path:
    """Where the built module is cached: ``$RECSYS_KERNELS_DIR``, else ``recsys/kernels`` in the
    user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``; the temp folder if that is not
    writable), one folder per source, torch, Python and CPU architecture, so a stale build is
    never loaded."""
    key = hashlib.sha256(
        b"".join(source.read_bytes() for source in SOURCES)
        + f"|{torch.__version__}|{sys.version}|{platform.machine()}".encode()
    ).hexdigest()[:16]
    return _cache_root() / key


def _cache_root() -> Path:
    if os.environ.get("RECSYS_KERNELS_DIR"):
        return Path(os.environ["RECSYS_KERNELS_DIR"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    root = Path(cache_home) / "recsys" / "kernels"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(tempfile.gettempdir()) / f"recsys-kernels-{os.getuid()}"
    return root


@contextlib.contextmanager
def _build_lock(where: Path) -> Iterator[None]:
    """Hold an OS lock on the build folder around torch's build, which waits without a timeout
    for its own lock file (``lock``) and leaves it behind when the process is killed inside
    the build or even inside its up-to-date check, blocking every later training. The OS
    releases ours when its holder dies, and every builder holds it while it holds torch's, so a
    ``lock`` found once ours is taken belongs to a dead process and is removed."""
    with open(where / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits for a live build in another process
        try:
            (where / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@cache
def _load() -> ModuleType | str:
    """The compiled module, or why it could not be built (one attempt per process)."""
    from torch.utils import cpp_extension

    try:
        where = build_directory()
    except OSError as exc:  # a copy of the package without its C++ sources
        return f"the kernel sources cannot be read ({exc.strerror}: {exc.filename})"
    built = any(where.glob(f"{NAME}*.so"))
    if not built:
        print(
            f"building the fused CPU kernels (once per machine, ~30 s) in {where}",
            file=sys.stderr,
        )
    start = time.perf_counter()
    try:
        where.mkdir(parents=True, exist_ok=True)
        with _build_lock(where):
            module = cpp_extension.load_inline(
                NAME,
                cpp_sources=[source.read_text() for source in SOURCES],
                functions=[
                    "adagrad_rows_",
                    "adagrad_dense_",
                    "bpr_max",
                    "dropout_mask",
                    "gru_cell_forward",
                    "gru_cell_backward",
                    "int4_upper",
                    "int4_vnni",
                    "readout_step_nll",
                ],
                # no FP traps: lets the compiler vectorise loops with selects (our exp, ELU)
                extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(where),
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: all the same
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return lines[-1] if lines else type(exc).__name__
    if not built:
        print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return module


def native_kernels(setting: str, device: torch.device) -> ModuleType | None:
    """Resolve ``train.kernels``: the compiled module, or None for torch ops.

    "auto": the kernels on a CPU when they build (else a note and torch ops); "native": the
    kernels or a clear error; "torch": torch ops. On a GPU training always uses torch ops.
    """
    if setting == "torch":
        return None
    if device.type != "cpu":
        if setting == "native":
            raise RecsysError(
                "train.kernels 'native' is for CPU training; use 'auto' or 'torch' "
                f"with train.device {device.type!r}"
            )
        return None
    loaded = _load()
    if isinstance(loaded, ModuleType):
        return loaded
    if setting == "native":
        raise RecsysError(
            f"train.kernels is 'native' but the kernels could not be built ({loaded}); "
            "install a C++ compiler (g++) and ninja, or use 'auto' or 'torch'"
        )
    _note_fallback(loaded)
    return None


@cache
def _note_fallback(reason: str) -> None:
    print(
        f"note: the fused training kernels could not be built ({reason}); training uses torch "
        "ops (same arithmetic, slower). Set train.kernels: torch to skip the attempt.",
        file=sys.stderr,
    )


def ranking_kernels() -> ModuleType | None:
    """The compiled module for the ranker's int4 pass, or None (silently: the ranker then uses
    torch's int4 kernel, with the same answers)."""
    loaded = _load()
    return loaded if isinstance(loaded, ModuleType) else None
