"""The REST app ``recsys serve`` runs: MLflow's scoring server for a logged model, behind a cap
on the request body.

MLflow 3.17's scoring server (``mlflow.pyfunc.scoring_server``) reads any body whole and parses
it before the model sees it, and neither it, uvicorn nor starlette has a size limit: one 8 MB
body kept a server busy for ~50 s. So ``recsys serve`` starts uvicorn on ``build_app`` instead of
``mlflow models serve``: the same ``/invocations``, ``/ping``, ``/health`` and ``/version`` of
``scoring_server.init``, with ``BodyLimit`` in front. A body over the cap is answered 413 from its
``Content-Length`` (or as soon as a chunked body passes the cap) without being parsed or kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from recsys.core.errors import RecsysError

MODEL_ENV = "RECSYS_SERVE_MODEL"  # the model URI build_app loads (models:/, runs:/ or a path)
MAX_BODY_ENV = "RECSYS_MAX_BODY_BYTES"
DEFAULT_MAX_BODY = 1_000_000  # 1 MB: ~150,000 item ids, far above any real batch of sessions
DRAIN_LIMIT = 64 * 2**20  # an over-cap body is read and dropped up to this, then the line closed

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def positive_env_int(name: str, default: int) -> int:
    """A positive integer setting from the environment; a bad value is a one-line error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise RecsysError(f"{name}={raw!r}: expected a positive whole number")
    return value


def _too_large(limit: int) -> bytes:
    return json.dumps(
        {
            "error_code": "REQUEST_TOO_LARGE",
            "message": f"the request body is larger than the server's limit of {limit:,} bytes; "
            f"send fewer or shorter sessions per request",
        }
    ).encode()


class BodyLimit:
    """ASGI middleware: HTTP bodies above ``max_bytes`` get 413 and never reach the app.

    The body under the cap is buffered and replayed to the app (which reads it whole anyway);
    one over the cap is drained without being kept, so the client reads the 413 instead of a
    reset connection, and the connection is closed after it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(receive, send, already=size, more=message.get("more_body"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only a disconnect can come

        await self.app(scope, replay, send)

    async def _refuse(
        self, receive: Receive, send: Send, already: int = 0, more: bool | None = True
    ) -> None:
        drained = already
        while more and drained <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        content = _too_large(self.max_bytes)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(content)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})


def build_app() -> ASGIApp:
    """The uvicorn factory (``uvicorn --factory recsys.serving.rest_app:build_app``): the model
    named by ``RECSYS_SERVE_MODEL`` in MLflow's scoring app, behind ``BodyLimit``."""
    from mlflow.pyfunc import scoring_server

    from recsys.serving.mlflow_store import connect

    # one store for runs and registry, as every recsys command has it: an MLFLOW_REGISTRY_URI
    # left in the environment (mlflow.set_registry_uri exports it) must not point elsewhere
    if os.environ[MODEL_ENV].startswith(("models:/", "runs:/")):
        connect(create=False)
    model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_ENV])
    limit = positive_env_int(MAX_BODY_ENV, DEFAULT_MAX_BODY)
    return BodyLimit(scoring_server.init(model), limit)


def main(argv: list[str]) -> None:
    """``python -m recsys.serving.rest_app MODEL_URI HOST PORT WORKERS`` (``recsys serve``):
    uvicorn on ``build_app``; its workers inherit the model URI from the environment."""
    import uvicorn

    model_uri, host, port, workers = argv
    os.environ[MODEL_ENV] = model_uri
    uvicorn.run(
        "recsys.serving.rest_app:build_app",
        factory=True,
        host=host,
        port=int(port),
        workers=int(workers),
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
