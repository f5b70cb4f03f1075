"""HTTP pieces the routes share: JSON bodies, server-sent events, OpenAI-shaped 404/405."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from schemas import Answer
from services.gateway.errors import ApiError


class JSON(Response):
    """A JSON body written by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class EventStream(StreamingResponse):
    """Server-sent events, with `on_close` awaited however the response ends (even when the
    client left before the body started)."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[Any]],
        headers: dict[str, str],
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}", code="bad_json") from None


async def next_piece(chunks: asyncio.Queue[str], answer: asyncio.Future[Answer]) -> str | None:
    """The next streamed piece, or None once the answer is there and the queue is empty."""
    if not chunks.empty():
        return chunks.get_nowait()
    getter = asyncio.ensure_future(chunks.get())
    either: set[asyncio.Future[Any]] = {getter, answer}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return None


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def not_found(request: Request, exc: Exception) -> Response:
    error = ApiError(404, f"no route {request.url.path}", code="not_found")
    return JSON(error.body(), status_code=404)


async def not_allowed(request: Request, exc: Exception) -> Response:
    error = ApiError(405, f"{request.method} is not allowed on {request.url.path}")
    return JSON(error.body(), status_code=405)
