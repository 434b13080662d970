"""Starting the ranks of a data-parallel run (recsys/training/distributed.py has the step).

``train.nproc`` N (``recsys train --nproc N``): the calling process becomes rank 0 (it keeps
the metrics, the model file and MLflow) and spawns N-1 helper ranks (torch.multiprocessing)
that meet it through a TCP store on 127.0.0.1; gloo talks over loopback. Under an external
launcher (``torchrun``), every process calls in and the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) says who it is. A helper's
failure reaches the user as one line from rank 0, never as a traceback.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys.config import ModelConfig, TrainConfig
from recsys.core.errors import RecsysError, first_line
from recsys.training.distributed import ParallelTrainer, World
from recsys.training.trainer import EpochCallback, TrainResult, resolve_device, train_gru4rec

DUMP_ENV = "RECSYS_REPLICA_DUMP"  # a folder: each rank saves its final state there (tests)


def launched_world() -> World | None:
    """The world an external launcher (torchrun) set up in the environment; None outside one."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return None
    return World(
        int(os.environ.get("RANK", "0")),
        size,
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", str(size))),
    )


def is_follower() -> bool:
    """Whether this process is a launched rank other than 0 (it trains, but writes nothing)."""
    world = launched_world()
    return world is not None and world.rank > 0


def check_parallel(cfg: TrainConfig, size: int, readout: bool, device: torch.device) -> None:
    """Refuse settings a data-parallel run cannot honour, before any process starts."""
    if size > cfg.batch_size:
        raise RecsysError(
            f"train.nproc: {size} processes but train.batch_size is {cfg.batch_size}: each "
            f"process needs at least one session-parallel slot; use at most {cfg.batch_size}"
        )
    unsupported = {
        "train.n_sample: 0 (in-batch negatives only)": cfg.n_sample == 0,
        f"train.bptt: {cfg.bptt}": cfg.bptt > 1,
        "model.readout (the repeat readout)": readout,
    }
    for what, present in unsupported.items():
        if present:
            raise RecsysError(f"{what} is not supported with train.nproc > 1; use train.nproc 1")
    if device.type == "cuda" and torch.cuda.device_count() < min(size, _local_size(size)):
        raise RecsysError(
            f"train.nproc: {size} processes on CUDA need one GPU each (NCCL), but this machine "
            f"has {torch.cuda.device_count()}; use train.device cpu (gloo) or fewer processes"
        )


def _local_size(size: int) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))


def _from_rank0(fn: Callable[[Any], Any] | None, world: World, device: torch.device) -> Any:
    """``fn`` answered by rank 0 and broadcast (the valid metric, early stopping's decision):
    every rank records the same value and leaves after the same epoch."""

    def answer(arg: Any) -> float:
        mine = float(fn(arg)) if world.rank == 0 and fn is not None else 0.0
        value = torch.tensor([mine], dtype=torch.float64).to(device)
        dist.broadcast(value, src=0)
        return float(value.item())

    return answer


def _run_rank(
    world: World,
    store: dist.Store | None,
    train: pl.DataFrame,
    n_items: int,
    model_config: ModelConfig,
    train_config: TrainConfig,
    options: dict[str, Any],
) -> TrainResult:
    """Join the process group, train this rank's part, leave the group."""
    device = resolve_device(train_config.device)
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if store is None:  # torchrun: MASTER_ADDR / MASTER_PORT from the environment
        dist.init_process_group(backend, rank=world.rank, world_size=world.size)
    else:
        dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size)
    options = dict(options)
    validates = options.pop("validates", options.get("validate") is not None)
    if world.rank > 0:
        os.environ["RECSYS_QUIET"] = "1"  # one progress bar: rank 0's
        options["on_epoch"] = None
    comm = device if device.type == "cuda" else torch.device("cpu")
    stop = _from_rank0(options.get("stop"), world, comm)
    options["stop"] = lambda history: bool(stop(history))
    if validates:
        options["validate"] = _from_rank0(options.get("validate"), world, comm)
    cfg = train_config.model_copy(update={"nproc": world.size})  # the checkpoint's key
    try:
        make = partial(ParallelTrainer, world=world)
        result = train_gru4rec(train, n_items, model_config, cfg, make=make, **options)
        dump = os.environ.get(DUMP_ENV)
        if dump:
            state = {"model": result.model.state_dict(), "optimizer": result.optimizer}
            torch.save(state, Path(dump) / f"rank{world.rank}.pt")
        return result
    finally:
        dist.destroy_process_group()


def _helper(
    index: int, port: int, size: int, errors: str, args: tuple[Any, ...], options: dict[str, Any]
) -> None:
    """A spawned rank (1..N-1): its part of the training; a failure leaves its message in
    ``errors`` for rank 0 to report, and exits non-zero without a traceback."""
    rank = index + 1
    try:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False)
        _run_rank(World(rank, size, rank, size), store, *args, options)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: rank 0 reports it, once
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - reported by rank 0 as one line
        kind = "error" if isinstance(exc, RecsysError) else "failure"
        Path(errors, f"rank{rank}.txt").write_text(f"{kind}\t{first_line(exc)}")
        raise SystemExit(1) from None


def _spawned(size: int, args: tuple[Any, ...], options: dict[str, Any]) -> TrainResult:
    """``train.nproc``: this process is rank 0 and spawns ranks 1..N-1 beside it."""
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)
    saved = {k: os.environ.get(k) for k in ("LOCAL_WORLD_SIZE", "GLOO_SOCKET_IFNAME")}
    threads = torch.get_num_threads()  # rank 0 takes cores // N; what runs after gets them back
    os.environ["LOCAL_WORLD_SIZE"] = str(size)  # threads.default_threads: cores // size
    if saved["GLOO_SOCKET_IFNAME"] is None and Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the ranks talk over loopback only
    with tempfile.TemporaryDirectory(prefix="recsys-ranks-") as errors:
        # the helpers' options: the callbacks are rank 0's (and closures do not pickle)
        quiet = {**options, "on_epoch": None, "validate": None, "stop": None}
        quiet["validates"] = options["validate"] is not None
        context = mp.start_processes(
            _helper,
            args=(store.port, size, errors, args, quiet),
            nprocs=size - 1,
            join=False,
            start_method="spawn",
        )
        try:
            result = _run_rank(World(0, size, 0, size), store, *args, options)
        except BaseException as exc:
            _stop_helpers(context.processes, grace=10.0)
            kind, helper = _helper_error(Path(errors))
            # a helper's own failure explains rank 0's lost connection; rank 0's own error,
            # and what the helpers hit because of it, are rank 0's to report
            lost = isinstance(exc, RuntimeError)  # torch's DistError is one
            if helper is not None and lost and (kind == "error" or isinstance(exc, dist.DistError)):
                raise helper from None
            raise
        finally:
            torch.set_num_threads(threads)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        _stop_helpers(context.processes, grace=60.0)
        _, helper = _helper_error(Path(errors))
        if helper is not None:
            raise helper
    return result


def _stop_helpers(processes: list[Any], grace: float) -> None:
    """Wait for the helper ranks, then end any still running (by their own process)."""
    for p in processes:
        p.join(grace)
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(5.0)


def _helper_error(errors: Path) -> tuple[str, RecsysError | None]:
    """The first helper rank's failure as one line (a user error before an internal one),
    with its kind: "error" (a ``RecsysError``) or "failure"."""
    found = sorted((p.read_text().split("\t", 1), p.stem) for p in errors.glob("rank*.txt"))
    if not found:
        return "", None
    (kind, message), rank = found[0]
    prefix = "" if kind == "error" else "training failed on "
    return kind, RecsysError(f"{prefix}{rank}: {message}")


def train_data_parallel(
    train: pl.DataFrame,
    n_items: int,
    model_config: ModelConfig,
    train_config: TrainConfig,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    epochs: int | None = None,
    on_epoch: EpochCallback | None = None,
    validate: Callable[[Any], float] | None = None,
    stop: Callable[[list[dict[str, Any]]], bool] | None = None,
    **extra: Any,
) -> TrainResult:
    """``train_gru4rec`` on ``train.nproc`` processes, or on the ranks a launcher started; the
    one-process path is ``train_gru4rec`` itself. Returns this rank's (identical) replica."""
    options: dict[str, Any] = {
        "checkpoint_dir": checkpoint_dir,
        "resume": resume,
        "epochs": epochs,
        "on_epoch": on_epoch,
        "validate": validate,
        "stop": stop,
        **extra,
    }
    world = launched_world()
    size = world.size if world is not None else train_config.nproc
    if world is not None and train_config.nproc not in (1, world.size):
        raise RecsysError(
            f"train.nproc is {train_config.nproc} but the launcher started {world.size} "
            f"processes; set train.nproc to 1 or {world.size}"
        )
    if size == 1:
        return train_gru4rec(train, n_items, model_config, train_config, **options)
    device = resolve_device(train_config.device)
    check_parallel(train_config, size, model_config.readout == "repeat", device)
    args = (train, n_items, model_config, train_config)
    if world is not None:
        return _run_rank(world, None, *args, options)
    return _spawned(size, args, options)
