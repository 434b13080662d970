"""The REST server: ``mlflow models serve`` on a registered model, started one way everywhere.

``recsys serve`` (and ``make serve``), the REST benchmark and the REST tests all start it here.
One uvicorn worker by default: with ``--workers N`` uvicorn's listener loses ``TCP_NODELAY``
(uvicorn issue #3149), and every keep-alive request after the first then waits ~40 ms for a
delayed ACK (measured: 44 ms p50 for one client with 2 workers, 5.5 ms with 1).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from recsys.config import Config
from recsys.core.errors import RecsysError
from recsys.serving.mlflow_store import CHAMPION

HOST = "127.0.0.1"  # loopback only, unless the user asks for more
START_TIMEOUT = 120.0


def champion_uri(config: Config) -> str:
    """The champion that ``recsys register`` keeps for a config, under its registered name."""
    return f"models:/{config.registered_model_name}@{CHAMPION}"


def check_servable(command: list[str], model_uri: str, host: str, port: int) -> None:
    """What the server would otherwise report as a page of tracebacks, checked before it
    starts: uvicorn, the store, the model (a registered alias or version, or a path; its
    weights file loads) and the port."""
    import importlib.util

    if not Path(command[0]).is_file() or importlib.util.find_spec("uvicorn") is None:
        raise RecsysError(f"{command[0]}: uvicorn (from mlflow) is not installed with it")
    if model_uri.startswith("models:/"):
        from mlflow.exceptions import MlflowException

        from recsys.serving.mlflow_store import connect

        client = connect(create=False)
        name, sep, alias = model_uri.removeprefix("models:/").partition("@")
        try:
            if sep:
                client.get_model_version_by_alias(name, alias)
            else:
                name, _, version = name.partition("/")
                client.get_model_version(name, version)
        except MlflowException:
            raise RecsysError(
                f"{model_uri}: no such registered model version; "
                f"run `recsys pipeline -c CONFIG` (or `recsys register`) first"
            ) from None
    elif not model_uri.startswith("runs:/") and not Path(model_uri).exists():
        raise RecsysError(f"{model_uri}: no such model file or directory")
    _check_weights(model_uri)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RecsysError(f"cannot serve on {host}:{port}: {exc.strerror}") from None


def _check_weights(model_uri: str) -> None:
    """The served model's weights file loads (a damaged or tampered one is one clear line)."""
    import tempfile

    from recsys.model.artifact import TrainedModel, find_model_file
    from recsys.serving.mlflow_store import download_model

    if model_uri.startswith(("models:/", "runs:/")):
        with tempfile.TemporaryDirectory(prefix="recsys-serve-check-") as tmp:
            TrainedModel.load(download_model(model_uri, Path(tmp)))
    else:
        TrainedModel.load(find_model_file(Path(model_uri)))


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_command(model_uri: str, port: int, host: str = HOST, workers: int = 1) -> list[str]:
    """The command line: uvicorn on ``recsys.serving.rest_app`` (MLflow's scoring app behind a
    body cap) in this environment; no ``mlflow models serve``, which has no way to cap it."""
    return [sys.executable, "-m", "recsys.serving.rest_app", model_uri, host, str(port)] + [
        str(workers)
    ]


def server_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's bin first on PATH: mlflow execs ``uvicorn`` from PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}


def start_server(
    command: list[str], env: Mapping[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a server command in its own process group (uvicorn is a child), output to ``log``:
    ``server_command``'s, or ``recsys serve`` (which execs it)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=server_env(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``/ping`` answers; a server that exits or stays silent is an error with its log."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RecsysError(
                f"the server exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise RecsysError(f"the server did not answer /ping in {START_TIMEOUT:.0f} s")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the whole process group, SIGKILL if it has not gone in 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def running_server(
    model_uri: str, env: Mapping[str, str], log: Path, workers: int = 1
) -> Iterator[str]:
    """A started, answering server on a free loopback port; its URL; stopped at the end."""
    port = free_port()
    proc = start_server(server_command(model_uri, port, workers=workers), env, log)
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(url, proc, log)
        yield url
    finally:
        stop_server(proc)
