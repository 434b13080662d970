"""The live recommendation service: an ASGI app (FastAPI) over the micro-batcher.

Routes (docs/serving.md has the bodies and answers):
``POST /sessions/{id}/clicks``, ``GET /sessions/{id}/recommendations``, ``DELETE /sessions/{id}``,
``POST /invocations`` (the body and answer of ``mlflow models serve``), ``GET /health``,
``GET /metrics`` (Prometheus text), ``POST /admin/reload`` (loopback clients only).

Bodies are read by hand, capped at ``body_limit`` bytes and parsed with ``json`` (never a
pickle); every refusal is a 4xx with a JSON reason, and no answer ever carries a traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from recsys.core.errors import RecsysError, first_line
from recsys.serving.live_batcher import Click, End, MicroBatcher, NoSession, Read, Stateless
from recsys.serving.live_follow import ModelFollower
from recsys.serving.live_metrics import Metrics
from recsys.serving.live_requests import (
    HttpError,
    parse_click,
    parse_invocation,
    parse_json,
    parse_k,
    session_key,
)
from recsys.serving.mlflow_store import DEFAULT_K

LOOPBACK = {"127.0.0.1", "::1"}
DEFAULT_BODY_LIMIT = 1_000_000  # bytes; larger bodies get a 413
DEFAULT_MAX_K = 1000


@dataclass
class LiveService:
    """What the routes need: the batcher (model + sessions), the follower, the limits."""

    batcher: MicroBatcher
    model_name: str  # the registered name, or the model path when not from a registry
    follower: ModelFollower | None = None
    body_limit: int = DEFAULT_BODY_LIMIT
    max_k: int = DEFAULT_MAX_K
    metrics: Metrics = field(default_factory=Metrics)

    async def run(self, op: Any) -> Any:
        try:
            return await asyncio.wrap_future(self.batcher.submit(op))
        except NoSession as err:
            raise HttpError(404, "NOT_FOUND", str(err)) from None
        except RecsysError as err:
            raise HttpError(400, "INVALID_PARAMETER_VALUE", str(err)) from None
        except Exception as exc:  # noqa: BLE001 - a bug: a reason, never a traceback
            raise HttpError(500, "INTERNAL_ERROR", first_line(exc)) from None

    def health(self) -> dict[str, Any]:
        follower = self.follower
        return {
            "status": "ok",
            "model": self.model_name,
            "version": self.batcher.label,
            "alias": follower.alias if follower else None,
            "items": self.batcher.rec.n_items,
            "sessions": len(self.batcher.store),
        }

    def metrics_text(self) -> str:
        store, batcher, follower = self.batcher.store, self.batcher, self.follower
        gauges = {
            "sessions": ("Live sessions held.", len(store)),
            "sessions_capacity": ("Most live sessions held.", store.capacity),
            "evictions_total": ("Sessions dropped for capacity or idleness.", store.evicted),
            "swaps_total": ("Model roll-overs done.", batcher.swaps),
            "swap_failures_total": (
                "Model roll-overs that failed (the old model kept serving).",
                follower.failures if follower else 0,
            ),
            "batches_total": ("Micro-batches run.", batcher.batches),
            "batched_operations_total": ("Operations run in micro-batches.", batcher.batched_ops),
            "batcher_busy_seconds_total": (
                "Time the batcher spent running batches.",
                batcher.busy_s,
            ),
            "catalogue_items": ("Items the model can recommend.", batcher.rec.n_items),
        }
        version = batcher.label
        if version is not None and str(version).isdigit():
            gauges["model_version"] = ("Registry version being served.", int(version))
        info = {"model": self.model_name, "version": str(version), "alias": self.alias}
        return self.metrics.render(gauges, info)

    @property
    def alias(self) -> str:
        return self.follower.alias if self.follower else ""


def _answer(status: int, body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=status)


class Timing:
    """ASGI middleware: each request's latency and status under its route's template."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - start)


def create_app(service: LiveService) -> FastAPI:
    """The FastAPI app for one service (no docs pages: the service answers its API only)."""
    app = FastAPI(title="recsys live", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Timing, metrics=service.metrics)

    @app.exception_handler(HttpError)
    async def http_error(request: Request, err: HttpError) -> JSONResponse:
        return _answer(err.status, {"error_code": err.code, "message": err.message})

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> JSONResponse:
        return _answer(500, {"error_code": "INTERNAL_ERROR", "message": first_line(exc)})

    @app.post("/sessions/{session_id}/clicks")
    async def click(session_id: str, request: Request) -> JSONResponse:
        body = parse_json(request, await _read(request, service.body_limit))
        item, k, exclude = parse_click(body, service.max_k)
        rec = await service.run(Click(session_key(session_id), item, k, exclude))
        return _answer(200, rec.as_dict())

    @app.get("/sessions/{session_id}/recommendations")
    async def recommendations(session_id: str, request: Request) -> JSONResponse:
        params = request.query_params
        k = parse_k(params.get("k", DEFAULT_K), service.max_k, "query parameter 'k'", True)
        exclude = params.get("exclude_seen", "false").lower()
        if exclude not in ("true", "false", "1", "0"):
            raise HttpError(
                400, "BAD_REQUEST", "query parameter 'exclude_seen' must be true or false"
            )
        rec = await service.run(Read(session_key(session_id), k, exclude in ("true", "1")))
        return _answer(200, rec.as_dict())

    @app.delete("/sessions/{session_id}")
    async def end(session_id: str) -> JSONResponse:
        key = session_key(session_id)
        return _answer(200, {"session_id": key, "deleted": await service.run(End(key))})

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        body = parse_json(request, await _read(request, service.body_limit), mlflow=True)
        numeric = service.batcher.rec.numeric_ids
        sessions, k, exclude = parse_invocation(body, numeric, service.max_k)
        recs = await service.run(Stateless(sessions, k, exclude))
        return _answer(200, {"predictions": [r.as_dict() for r in recs]})

    @app.get("/health")
    async def health() -> JSONResponse:
        return _answer(200, service.health())

    @app.get("/ping")
    async def ping() -> Response:
        return Response("\n", media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            service.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        client = request.client.host if request.client else ""
        if client not in LOOPBACK:
            raise HttpError(403, "PERMISSION_DENIED", "/admin/reload answers loopback clients only")
        if service.follower is None:
            raise HttpError(
                409, "BAD_REQUEST", "this service does not follow a registry alias (--model PATH)"
            )
        try:
            outcome = await asyncio.to_thread(service.follower.check)
        except RecsysError as err:
            raise HttpError(503, "RELOAD_FAILED", str(err)) from None
        return _answer(200, outcome)

    return app


async def _read(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes ``limit`` bytes (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HttpError(413, "REQUEST_TOO_LARGE", f"the body is over the {limit:,}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, "REQUEST_TOO_LARGE", f"the body is over the {limit:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["LiveService", "create_app", "json"]
