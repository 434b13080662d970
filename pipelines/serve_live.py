"""``recsys serve-live``: the live service (recsys.serving.live_app) under uvicorn.

The model is a registry alias (``models:/name@alias``, by default the config's champion), which
the service follows, or a fixed version or model path, which it serves as is. One uvicorn
worker on 127.0.0.1 unless told otherwise: the sessions live in the process, so a second worker
would hold other sessions (and uvicorn issue #3149 would add ~40 ms per keep-alive request).
"""

from __future__ import annotations

import gc
import socket
import sys
from dataclasses import dataclass
from typing import Any

from recsys.core.errors import RecsysError

HOST = "127.0.0.1"
# The batcher thread and the event loop share the GIL; with Python's default 5 ms switch
# interval a batch waits up to 5 ms for it after each torch op. Measured with 50 closed-loop
# clients on the shared 2-core VM: 209 clicks/s at 5 ms, 370-440 at 0.5 ms.
SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class LiveOptions:
    """Everything ``recsys serve-live`` can set (its ``--help`` explains each)."""

    host: str = HOST
    port: int = 5056
    capacity: int = 100_000
    ttl_seconds: float = 1800.0
    max_clicks: int = 200
    poll_seconds: float = 30.0
    window_ms: float = 0.0  # see docs/serving.md, "Micro-batching": measured A/B
    max_batch: int = 64
    body_limit: int = 1_000_000
    max_k: int = 1000


def check_port(host: str, port: int) -> None:
    """A port taken or an address not ours is one line now, not a uvicorn traceback later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RecsysError(f"cannot serve on {host}:{port}: {exc.strerror}") from None


def build_service(model_uri: str, options: LiveOptions) -> Any:
    """Load the model (resolving an alias to its version) and wire batcher, store, follower."""
    from recsys.serving.live_app import LiveService
    from recsys.serving.live_batcher import MicroBatcher
    from recsys.serving.live_follow import (
        ModelFollower,
        alias_version,
        live_recommender,
        load_version,
    )
    from recsys.serving.live_store import SessionStore

    store = SessionStore(options.capacity, options.ttl_seconds, options.max_clicks)
    window = options.window_ms / 1000.0
    followed = _alias(model_uri)
    if followed is None:
        rec = live_recommender(model_uri)
        batcher = MicroBatcher(rec, store, window, options.max_batch, label=None)
        return LiveService(batcher, model_uri, None, options.body_limit, options.max_k)
    name, alias = followed
    version = alias_version(name, alias)
    batcher = MicroBatcher(load_version(name, version), store, window, options.max_batch, version)
    follower = ModelFollower(batcher, name, alias, version, options.poll_seconds)
    follower.start()
    return LiveService(batcher, name, follower, options.body_limit, options.max_k)


def _alias(uri: str) -> tuple[str, str] | None:
    from recsys.serving.live_follow import split_alias_uri

    return split_alias_uri(uri)


def run_live(model_uri: str, options: LiveOptions) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown)."""
    import uvicorn

    from recsys.serving.live_app import create_app

    check_port(options.host, options.port)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    service = build_service(model_uri, options)
    where = f"http://{options.host}:{options.port}"
    follows = f", following {model_uri}" if service.follower else ""
    print(f"serving {model_uri} live on {where}{follows} (Ctrl-C stops it)", file=sys.stderr)
    app = create_app(service)
    # What start-up made (imports, the model, MLflow's client) lives as long as the process:
    # frozen, the cyclic GC stops scanning it, whose ~220,000 objects made each full collection
    # a 30-120 ms pause of every request (measured with gc.callbacks under 50 paced clients).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=options.host,
        port=options.port,
        workers=1,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    service.batcher.close()
    if service.follower:
        service.follower.stop()
