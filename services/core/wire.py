"""Validation at the edge: bytes off the wire become a model, or a BadInput saying why."""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import ValidationError

from schemas import Message
from services.core.errors import BadInput

M = TypeVar("M", bound=Message)


def parse_payload(model: type[M], payload: bytes, max_payload: int) -> M:
    """Bytes to model, or BadInput with the precise reason (size, JSON, version, schema)."""
    if len(payload) > max_payload:
        raise BadInput("too_large", f"payload of {len(payload)} bytes exceeds {max_payload}")
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadInput("bad_json", f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput("bad_schema", f"expected a JSON object, got {type(data).__name__}")
    if data.get("v") != 1:
        raise BadInput("bad_version", f"schema version {data.get('v')!r} not supported (want v: 1)")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadInput("bad_schema", _summarize(exc)) from None


def _summarize(exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:4]]
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def request_id_of(payload: bytes) -> str | None:
    """Best effort: the request id of a payload we refused, so the requester can match it."""
    try:
        data = orjson.loads(payload) if len(payload) < 65536 else None
    except orjson.JSONDecodeError:
        return None
    value = data.get("request_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
