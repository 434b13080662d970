"""Where a study lives and what it leaves behind: the Optuna storage, the study's identity, the
trials of dead workers, and the outputs (``best.yaml``, plots, the trials table, the tune run).

The storage is an Optuna RDB database: SQLite beside the MLflow store by default, or any URL
that several workers share. A worker killed mid-trial leaves its trial RUNNING; the next start
on the same host marks it FAIL at once (its process is gone), Optuna's heartbeat does the same
for other hosts after ``GRACE_SECONDS``. Failed trials are not re-run: the sampler draws anew.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
import zlib
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import polars as pl
import yaml
from optuna.trial import FrozenTrial, TrialState

from pipelines.cache import step_key
from pipelines.tracking import StepRun, Tracker, guard
from recsys.config import Config, config_from_dict
from recsys.core.atomic import atomic_path, write_text
from recsys.core.errors import RecsysError, first_line
from recsys.serving.mlflow_store import DEFAULT_STORE_DIR, tracking_uri

STORE_FILE = "optuna.db"
TUNING_DIR = "tuning"
BEST_FILE = "best.yaml"
TRIALS_FILE = "trials.csv"
WORKER_ATTR = "recsys.worker"  # host, pid and process start time of the trial's worker
VALUES_ATTR = "recsys.values"  # the trial's config values, dotted key -> value
KEY_ATTR = "recsys.key"  # what the study's trials are comparable under (data, space, config)
FAILED_ATTR = "recsys.failed"
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 300  # a trial without a heartbeat for this long is failed by any worker
# Keys that change neither what a trial computes nor how well: not part of the study's identity.
NOT_IN_KEY = {"epochs", "early_stopping", "device", "threads", "kernels"}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def default_storage() -> str:
    """SQLite ``optuna.db`` beside the MLflow store (``mlops/`` here unless MLflow is elsewhere)."""
    uri = tracking_uri()
    local = uri.startswith("sqlite:///")
    folder = Path(uri.removeprefix("sqlite:///")).parent if local else DEFAULT_STORE_DIR.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / STORE_FILE}"


def shown(url: str) -> str:
    """The URL without its password, for messages and the best.yaml header."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given
        return url


@contextmanager
def storage_errors(url: str):  # type: ignore[no-untyped-def]
    """An unusable database is one line naming it, not a SQLAlchemy traceback."""
    try:
        yield
    except RecsysError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means the storage is unusable
        hint = (
            " (install the database's driver, e.g. psycopg2)"
            if isinstance(exc, ImportError)
            else ""
        )
        raise RecsysError(f"Optuna storage {shown(url)}: {first_line(exc)}{hint}") from None


def open_storage(url: str) -> optuna.storages.RDBStorage:
    if "://" not in url:
        raise RecsysError(
            f"--storage {url!r} is not a database URL: expected e.g. sqlite:///path/optuna.db "
            "or postgresql://user:password@host/database"
        )
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with storage_errors(url), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the heartbeat is marked experimental
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
        )


def study_key(config: Config, fingerprint: str) -> str:
    """The data, the space, the target and every model/train key the space leaves as is."""
    fixed = {
        name: {
            k: v
            for k, v in section.model_dump(mode="json", exclude_defaults=True).items()
            if f"{name}.{k}" not in config.tune.space and k not in NOT_IN_KEY
        }
        for name, section in (("model", config.model), ("train", config.train))
    }
    tune = config.tune.model_dump(
        mode="json", include={"space", "metric", "max_epochs", "patience"}
    )
    return step_key(fingerprint, json.dumps({"fixed": fixed, "tune": tune}, sort_keys=True))


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks ('' without /proc, or for a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def process_alive(worker: dict[str, Any]) -> bool:
    """Whether the worker's process still runs (the same process, not a reused pid)."""
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return not worker.get("start") or _start_time(int(worker["pid"])) == worker["start"]


def fail_dead_trials(rdb: optuna.storages.RDBStorage, study_name: str) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker ran on this host and is gone (kill -9, power
    loss); returns their numbers. Other hosts' trials are left to Optuna's heartbeat."""
    host = socket.gethostname()
    study_id = rdb.get_study_id_from_name(study_name)
    failed = []
    for trial in rdb.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not isinstance(worker, dict) or worker.get("host") != host or process_alive(worker):
            continue
        trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            rdb.set_trial_user_attr(trial_id, FAILED_ATTR, f"its worker (pid {worker['pid']}) died")
            rdb.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker on this host got there first
        failed.append(trial.number)
    return failed


def open_study(
    config: Config, rdb: optuna.storages.RDBStorage, url: str, fingerprint: str, shared: bool
) -> tuple[optuna.Study, dict[str, Any]]:
    """Create or continue the config's study; returns it and this worker's identity."""
    tune = config.tune
    name = tune.study or config.name
    if tune.pruner.kind == "median":
        # reported steps are epochs 1, 2, ...: warmup_epochs = 1 judges a trial after epoch 2 first
        pruner: optuna.pruners.BasePruner = optuna.pruners.MedianPruner(
            n_startup_trials=tune.pruner.startup_trials,
            n_warmup_steps=tune.pruner.warmup_epochs + 1,
        )
    else:
        pruner = optuna.pruners.NopPruner()
    with storage_errors(url):
        study = optuna.create_study(
            storage=rdb, study_name=name, direction="maximize", load_if_exists=True, pruner=pruner
        )
        key = study_key(config, fingerprint)
        found = study.user_attrs.get(KEY_ATTR)
        if found is None and not study.get_trials(
            deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.FAIL)
        ):
            study.set_user_attr(KEY_ATTR, key)  # a new study (enqueued trials may wait in it)
        elif found != key or study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise RecsysError(
                f"study {name!r} in {shown(url)} was run on another dataset, search space or "
                f"config: set tune.study to a new name, or delete it with `optuna delete-study "
                f"--study-name {name} --storage URL`"
            )
        for number in fail_dead_trials(rdb, name):
            print(f"trial {number} was left running by a worker that died: marked failed")
        worker = worker_identity()
        # A new seed per start: a rerun must not replay the first run's random startup trials,
        # nor two workers of one shared study each other's.
        mix = zlib.crc32(json.dumps(worker, sort_keys=True).encode()) if shared else 0
        seed = (tune.seed + len(study.trials) + mix) % 2**32
        study.sampler = optuna.samplers.TPESampler(seed=seed)
    return study, worker


def best_config(config: Config, trial: FrozenTrial) -> dict[str, Any]:
    """The config as written (keys left unset stay unset) with the trial's values and its best
    epoch count, without early stopping: the pipeline refits on train for that many epochs."""
    raw = config.model_dump(mode="json", exclude_unset=True)
    for key, value in trial.user_attrs[VALUES_ATTR].items():
        section, _, field = key.partition(".")
        raw.setdefault(section, {})[field] = value
    train = raw.setdefault("train", {})
    train["epochs"] = trial.user_attrs["best_epoch"]
    train.pop("early_stopping", None)
    config_from_dict(raw)  # a best.yaml that is written is one that loads
    return raw


def write_outputs(
    config: Config, study: optuna.Study, url: str, run: tuple[Tracker, str] | None
) -> dict[str, Any]:
    """best.yaml, the plots and trials.csv under ``data/<name>/tuning/``; logged on the run."""
    counts = {
        s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState
    }
    if not counts["complete"]:
        raise RecsysError(
            f"study {study.study_name!r} has no complete trial yet ({_counted(counts)}); "
            "run more trials (--trials N)"
        )
    best = study.best_trial
    out = config.run_dir / TUNING_DIR
    metric, epochs = config.tune.metric, best.user_attrs["best_epoch"]
    header = (
        f"# Tuned by `recsys tune` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
        f"# study {study.study_name!r} in {shown(url)}: {_counted(counts)}\n"
        f"# best: trial {best.number}, valid {metric} {best.value:.4f} after {epochs} epochs "
        "(trained on train_tr, scored on valid; test not read)\n"
        f"# run it as it is: recsys pipeline -c {out / BEST_FILE} (refits on train)\n"
    )
    raw = best_config(config, best)
    write_text(out / BEST_FILE, header + yaml.safe_dump(raw, sort_keys=False))
    files = [out / BEST_FILE, _trials_table(study, out / TRIALS_FILE), *_plots(study, out)]
    if run is not None:
        tracker, run_id = run
        _log_best(tracker, run_id, best, counts, metric, files)
    print(
        f"study {study.study_name!r}: {_counted(counts)}; best trial {best.number}: valid "
        f"{metric} {best.value:.4f} after {epochs} epochs\nbest config: {out / BEST_FILE} "
        f"(run it: recsys pipeline -c {out / BEST_FILE})"
    )
    return {
        "best_trial": best.number,
        "value": best.value,
        "best_epoch": epochs,
        "counts": counts,
        "best_file": out / BEST_FILE,
    }


def _counted(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    parts = [f"{n} {state}" for state, n in counts.items() if n and state != "waiting"]
    return f"{total} trials ({', '.join(parts)})"


def _log_best(
    tracker: Tracker,
    run_id: str,
    best: FrozenTrial,
    counts: dict[str, int],
    metric: str,
    files: list[Path],
) -> None:
    from mlflow.entities import Param

    values = best.user_attrs[VALUES_ATTR] | {"train.epochs": best.user_attrs["best_epoch"]}
    params = [
        Param(f"best.{k}", json.dumps(v) if isinstance(v, list) else str(v))
        for k, v in values.items()
    ]
    with guard("logging the best trial"):
        tracker.client.log_batch(run_id, params=params)
    run = StepRun(tracker.client, run_id)
    run.tags({"recsys.best_trial": str(best.number)})
    run.metrics(
        {f"best_valid_{metric}": float(best.value or 0.0), "best_trial": best.number}
        | {"best_epoch": best.user_attrs["best_epoch"]}
        | {f"trials_{state}": n for state, n in counts.items()}
    )
    for path in files:
        run.artifact(path, TUNING_DIR)


def _trials_table(study: optuna.Study, path: Path) -> Path:
    rows = [
        {
            "trial": t.number,
            "state": t.state.name,
            "value": t.value,
            "best_epoch": t.user_attrs.get("best_epoch"),
            "epochs": t.user_attrs.get("epochs"),
            "seconds": t.user_attrs.get("seconds"),
        }
        | {
            k: json.dumps(v) if isinstance(v, list) else str(v)
            for k, v in t.user_attrs.get(VALUES_ATTR, {}).items()
        }
        for t in study.get_trials(deepcopy=False)
    ]
    with atomic_path(path) as tmp:
        pl.DataFrame(rows, infer_schema_length=None).write_csv(tmp)
    return path


def _plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances, drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as draw

    written = []
    for name, plot in (
        ("history.png", draw.plot_optimization_history),
        ("importances.png", draw.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental, and tight_layout's notes
                ax = plot(study)
                ax.figure.set_size_inches(7, 4.5)
                ax.figure.tight_layout()
        except Exception as exc:  # noqa: BLE001 - a plot is a bonus: too few trials skip it
            print(f"note: no {name} ({first_line(exc)})")
            continue
        with atomic_path(out / name) as tmp:
            ax.figure.savefig(tmp, format="png", dpi=110)
        plt.close(ax.figure)
        written.append(out / name)
    return written
