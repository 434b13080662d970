"""Request checking for the live service: every refusal is one ``HttpError`` with a reason.

Bodies are JSON only (``json.loads``; NaN and Infinity refused), item ids integers or strings
(a JSON ``true`` or ``1.5`` is no id), ``k`` an integer from 1 to the service's bound. Well-typed
ids the model does not know are no error: the library skips and reports them (``unknown``).
``/invocations`` takes what ``mlflow models serve`` takes for our pyfunc's signature: a
``dataframe_records`` or ``dataframe_split`` frame with an ``items`` column, ``params`` k and
exclude_seen.
"""

from __future__ import annotations

import json
from typing import Any

from recsys.serving.mlflow_store import DEFAULT_K, SESSION_COLUMN

MAX_ID_CHARS = 256  # a session or item id longer than this is refused
CLICK_FIELDS = {"item", "k", "exclude_seen"}


class HttpError(Exception):
    """A refused request: HTTP status, an MLflow-style error code, one line of reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def bad(message: str) -> HttpError:
    return HttpError(400, "BAD_REQUEST", message)


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def parse_json(request: Any, body: bytes, mlflow: bool = False) -> Any:
    """The body as JSON. ``/invocations`` (``mlflow``) also requires a JSON content type and
    answers 415 otherwise, as MLflow does; the session routes read any body as JSON."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if mlflow and kind != "application/json":
        raise HttpError(
            415, "BAD_REQUEST", f"content type {kind!r} is not supported; use application/json"
        )
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as err:
        what = "Ensure that input is a valid JSON formatted string" if mlflow else "invalid JSON"
        raise bad(f"{what}: {err}") from None


def session_key(session_id: str) -> str:
    if not session_id or len(session_id) > MAX_ID_CHARS:
        raise bad(f"a session id must have 1 to {MAX_ID_CHARS} characters")
    return session_id


def parse_k(value: Any, max_k: int, name: str = "field 'k'", query: bool = False) -> int:
    """An integer from 1 to ``max_k`` (in a ``query`` string, its digits)."""
    if query and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_k:
        raise bad(f"{name} must be an integer from 1 to {max_k}, got {value!r}")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {value!r}")
    return value


def item_id(value: Any, name: str = "field 'item'") -> Any:
    """An integer or a string of at most MAX_ID_CHARS characters."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise bad(f"{name} must be an item id (an integer or a string), got {value!r}")
    if isinstance(value, str) and len(value) > MAX_ID_CHARS:
        raise bad(f"{name} is over {MAX_ID_CHARS} characters")
    return value


def parse_click(body: Any, max_k: int) -> tuple[Any, int, bool]:
    """``{"item": ..., "k": 20, "exclude_seen": false}`` -> (item, k, exclude_seen)."""
    if not isinstance(body, dict):
        raise bad('the body must be a JSON object such as {"item": 123, "k": 20}')
    extra = sorted(set(body) - CLICK_FIELDS)
    if extra:
        raise bad(f"unexpected field(s) {extra}; expected {sorted(CLICK_FIELDS)}")
    if "item" not in body:
        raise bad("field 'item' is missing")
    k = parse_k(body.get("k", DEFAULT_K), max_k)
    return item_id(body["item"]), k, _flag(body.get("exclude_seen", False), "field 'exclude_seen'")


def _session(value: Any, numeric: bool, row: int) -> list[Any]:
    """One ``items`` cell: a list of ids of the catalogue's kind (the signature's Array type)."""
    kind = "long" if numeric else "string"
    ok = isinstance(value, list) and all(
        not isinstance(v, bool) and isinstance(v, int if numeric else str) for v in value
    )
    if not ok:
        raise bad(
            f"Failed to convert column {SESSION_COLUMN} to type 'Array({kind})': "
            f"row {row} is {json.dumps(value)[:80]}"
        )
    return value


def parse_invocation(body: Any, numeric: bool, max_k: int) -> tuple[list[list[Any]], int, bool]:
    """An ``mlflow models serve`` body -> (sessions, k, exclude_seen)."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object with 'dataframe_records' or 'dataframe_split'")
    frames = [key for key in ("dataframe_records", "dataframe_split") if key in body]
    if len(frames) != 1 or set(body) - {frames[0], "params"}:
        raise bad(
            "the body must hold exactly one of 'dataframe_records' or 'dataframe_split' "
            f"(and optional 'params'); got keys {sorted(body)}"
        )
    if frames[0] == "dataframe_records":
        records = body["dataframe_records"]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise bad("'dataframe_records' must be a list of objects")
        if any(SESSION_COLUMN not in r for r in records):
            raise bad(f"Model is missing inputs ['{SESSION_COLUMN}']")
        cells = [r[SESSION_COLUMN] for r in records]
    else:
        split = body["dataframe_split"]
        columns = split.get("columns") if isinstance(split, dict) else None
        data = split.get("data") if isinstance(split, dict) else None
        if not isinstance(columns, list) or not isinstance(data, list):
            raise bad("'dataframe_split' must be an object with 'columns' and 'data' lists")
        if SESSION_COLUMN not in columns:
            raise bad(f"Model is missing inputs ['{SESSION_COLUMN}']")
        at = columns.index(SESSION_COLUMN)
        if not all(isinstance(row, list) and len(row) == len(columns) for row in data):
            raise bad(f"every 'data' row must be a list of {len(columns)} values")
        cells = [row[at] for row in data]
    sessions = [_session(cell, numeric, i) for i, cell in enumerate(cells)]
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise bad("'params' must be an object")
    k = parse_k(params.get("k", DEFAULT_K), max_k, "params.k")
    return sessions, k, _flag(params.get("exclude_seen", False), "params.exclude_seen")
