"""Model roll-over for the live service: follow a registry alias, swap without dropping sessions.

``ModelFollower.check`` asks the registry which version the alias names; when it moved, the new
version is loaded on a background thread of the lowest priority (the service keeps answering
on the old model meanwhile), then handed to the micro-batcher, which replays every live session
into it between batches and swaps model and states at once (``recsys.serving.live_migrate``).
No session is lost or answered from a half-swapped state. Polling runs on a daemon thread.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from recsys.core.errors import RecsysError, first_line
from recsys.serving.live_batcher import MicroBatcher, Migrate
from recsys.serving.recommender import SessionRecommender


def split_alias_uri(uri: str) -> tuple[str, str] | None:
    """``models:/name@alias`` -> (name, alias); None for any other model reference."""
    if not uri.startswith("models:/"):
        return None
    name, sep, alias = uri.removeprefix("models:/").partition("@")
    return (name, alias) if sep and name and alias else None


def alias_version(name: str, alias: str) -> str:
    """The version an alias names now; a clear error if the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    from recsys.serving.mlflow_store import connect

    client = connect()
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        raise RecsysError(
            f"models:/{name}@{alias}: no such registered model version; "
            f"run `recsys pipeline -c CONFIG` (or `recsys register`) first"
        ) from None


def load_version(name: str, version: str) -> SessionRecommender:
    return live_recommender(f"models:/{name}/{version}")


def live_recommender(uri: str) -> SessionRecommender:
    """A model as the live service scores it: one thread, both catalogue passes built (on the
    loading thread: in the background for a swap)."""
    rec = SessionRecommender.load(uri, threads=1)
    rec.prepare_batches()
    return rec


def in_background(work: Callable[[], Any]) -> Any:
    """Run ``work`` on a thread of the lowest CPU priority and wait for it: loading must not
    take a core from the batcher that keeps answering meanwhile (Linux gives each thread its
    own nice value)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="live-rollover", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


ROLLOVER_TIMEOUT_S = 3600.0  # 100,000 held sessions replay in about a minute of worker time


class ModelFollower:
    """Keeps a batcher on the version that ``models:/name@alias`` names."""

    def __init__(
        self,
        batcher: MicroBatcher,
        name: str,
        alias: str,
        version: str,
        poll_seconds: float = 30.0,
        loader: Callable[[str, str], SessionRecommender] = load_version,
    ) -> None:
        self.batcher = batcher
        self.name = name
        self.alias = alias
        self.version = version
        self.poll_seconds = poll_seconds
        self.loader = loader
        self.failures = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()  # one roll-over at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> dict[str, Any]:
        """Follow the alias now: load, replay and swap if it moved. Errors keep the old model."""
        with self._lock:
            try:
                latest = alias_version(self.name, self.alias)
                if latest == self.version:
                    return {"swapped": False, "version": self.version}
                new = in_background(lambda: self.loader(self.name, latest))
                done = self.batcher.call(Migrate(new, latest), timeout=ROLLOVER_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a failed roll-over must not stop serving
                self.failures += 1
                self.last_error = first_line(exc)
                raise RecsysError(f"model roll-over failed: {self.last_error}") from None
            previous, self.version = self.version, latest
            return {"swapped": True, "version": latest, "previous": previous, **done}

    def start(self) -> None:
        if self.poll_seconds > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="live-follower", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                outcome = self.check()
            except RecsysError as err:
                print(f"warning: {err}", file=sys.stderr, flush=True)
                continue
            if outcome["swapped"]:
                print(
                    f"now serving models:/{self.name}/{outcome['version']} "
                    f"(was {outcome['previous']}; {outcome['replayed']} sessions replayed)",
                    file=sys.stderr,
                    flush=True,
                )
