"""The gateway's side of the bus: a `Query` out, its `Answer` (and token stream) back.

One subscription to computation/stream/<itself>/+ (the broker lets only us read it) feeds the
streams of every request in flight here; a chunk of a request not in flight is dropped before it
is parsed. The gateway also keeps
what the dashboard shows: the last queries with their provenance, and outcomes per second.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from schemas import Answer, CmsEntry, Query, SamplingOptions, TokenChunk
from services.core.bus import Bus
from services.core.client import QueryClient
from services.core.cms import CmsView
from services.core.errors import BadInput, DeadlineExceeded, RemoteError
from services.core.topics import METRIC, STREAM
from services.core.transcript import Transcript
from services.core.wire import parse_payload
from services.gateway.errors import ApiError

log = structlog.get_logger("edgecollab.gateway")

RATE_WINDOW_S = 10.0  # outcomes per second are averaged over this window
USAGE_FLUSH_S = 2.0  # cms/tenants/<tenant>/tokens_used is written at most this often


@dataclass(slots=True)
class Exchange:
    """One query in flight: its stream of text pieces, and the answer's task."""

    query: Query
    chunks: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    transcript: Transcript = field(default_factory=Transcript)  # which chunks to pass on
    answer: asyncio.Task[Answer] | None = None


class Gateway:
    """Sends queries for HTTP clients and remembers what the dashboard shows."""

    def __init__(self, *, bus: Bus, view: CmsView, recent: int = 50) -> None:
        self.bus = bus
        self.view = view
        self.client = QueryClient(bus, view)  # resends a query whose orchestrator died
        self.in_flight = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.changed = asyncio.Event()  # the dashboard's state changed
        self._exchanges: dict[str, Exchange] = {}
        self._outcomes: deque[tuple[float, str]] = deque()
        self.served = Counter[str]()
        bus.listen_raw(STREAM.filter(client=bus.client_id), self._on_chunk, qos=STREAM.qos)
        view.on_change(self._on_cms_change)

    # -- the bus -------------------------------------------------------------------------------

    @asynccontextmanager
    async def exchange(self, query: Query) -> AsyncIterator[Exchange]:
        """Send `query`; the block reads its stream and awaits `exchange.answer`."""
        exchange = Exchange(query)
        self._exchanges[query.request_id] = exchange
        self.in_flight += 1
        answer = exchange.answer = asyncio.create_task(self._ask(query, exchange.transcript))
        answer.add_done_callback(_retrieved)
        try:
            yield exchange
        finally:
            self.in_flight -= 1
            self._exchanges.pop(query.request_id, None)
            if not answer.done():  # the client went away: stop waiting for it
                answer.cancel()

    async def _ask(self, query: Query, transcript: Transcript) -> Answer:
        """The orchestrator's answer, or an ApiError saying why there is none."""
        if not self.bus.connected.is_set():
            raise ApiError(503, "the gateway is not connected to the broker", code="no_broker")
        if not any(a.online for a in self.view.agents("orchestrator")):
            raise ApiError(503, "no orchestrator is online", code="no_agent")
        try:
            async with asyncio.timeout(max(0.0, query.deadline - time.time())):
                reply = await self.client.ask(query, transcript)
        except (TimeoutError, DeadlineExceeded):
            raise ApiError(
                504, f"no answer within {query.deadline - time.time():.0f} s", code="deadline"
            ) from None
        except RemoteError as exc:
            raise _remote(exc) from None
        assert isinstance(reply, Answer)
        return reply

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        params = STREAM.match(topic)
        exchange = self._exchanges.get(params["request"]) if params else None
        if exchange is None:
            return  # a request no longer in flight
        try:
            chunk = parse_payload(TokenChunk, payload, self.bus.settings.max_payload)
        except BadInput as exc:
            log.warning("stream.refused", topic=topic, reason=str(exc))
            return
        if (text := exchange.transcript.add(chunk)) is not None:
            exchange.chunks.put_nowait(text)

    # -- what the dashboard and /metrics show ------------------------------------------------

    def record(
        self, query: Query, *, status: int, outcome: str, answer: Answer | None, detail: str = ""
    ) -> None:
        """Remember one finished request (answered or refused)."""
        now = time.time()
        self._outcomes.append((now, outcome))
        self.served[outcome] += 1
        entry: dict[str, Any] = {
            "request_id": query.request_id,
            "tenant": query.tenant,
            "text": query.text[:300],
            "at": now,
            "status": status,
            "outcome": outcome,
            "detail": detail,
        }
        if answer is not None:
            entry |= {
                "partial": answer.partial,
                "ms": answer.ms,
                "cost_usd": answer.cost_usd,
                "steps": [s.model_dump(mode="json") for s in answer.steps],
            }
        self.recent.appendleft(entry)
        self.changed.set()

    def rates(self) -> dict[str, float]:
        """Requests per second by outcome over the last RATE_WINDOW_S."""
        cutoff = time.time() - RATE_WINDOW_S
        while self._outcomes and self._outcomes[0][0] < cutoff:
            self._outcomes.popleft()
        counts = Counter(outcome for _, outcome in self._outcomes)
        return {outcome: round(n / RATE_WINDOW_S, 3) for outcome, n in sorted(counts.items())}

    def orchestrator_metrics(self) -> dict[str, dict[str, Any]]:
        """cms/metrics/<orchestrator>/requests of every orchestrator (all clients' queries)."""
        found = {}
        for key, entry in self.view.items("metrics/"):
            params = METRIC.match(key)
            if params and params["name"] == "requests" and isinstance(entry.value, dict):
                found[params["scope"]] = entry.value
        return found

    def agent_metrics(self) -> dict[str, dict[str, Any]]:
        """Per-agent entries under cms/metrics/<agent>/<name> (all but `requests`)."""
        found: dict[str, dict[str, Any]] = {}
        for key, entry in self.view.items("metrics/"):
            params = METRIC.match(key)
            if params and params["name"] != "requests":
                found.setdefault(params["scope"], {})[params["name"]] = entry.value
        return found

    def _on_cms_change(self, key: str, entry: CmsEntry | None) -> None:
        if key.startswith(("cms/agents/", "cms/metrics/", "cms/experiments/")):
            self.changed.set()


def _retrieved(task: asyncio.Task[Answer]) -> None:
    """Mark an answer's error as seen: a client that went away never awaits it."""
    if not task.cancelled():
        task.exception()


def new_query(
    text: str,
    *,
    tenant: str,
    max_tokens: int,
    timeout_s: float,
    stream: bool,
    sampling: SamplingOptions,
) -> Query:
    return Query(
        request_id=f"gw-{uuid.uuid4().hex[:16]}",
        text=text,
        max_tokens=max_tokens,
        deadline=time.time() + timeout_s,
        stream=stream,
        tenant=tenant,
        sampling=sampling,
    )


def _remote(exc: RemoteError) -> ApiError:
    """An Error from the orchestrator as the status an HTTP client expects."""
    code = exc.error.code
    if code in ("bad_request", "bad_schema", "too_large", "bad_json", "bad_version"):
        return ApiError(400, exc.error.message, code=code)
    if code == "deadline":
        return ApiError(504, exc.error.message, code=code)
    if code == "unavailable":
        return ApiError(503, exc.error.message, code=code)
    if code == "quota":  # the orchestrators count every tenant's tokens (cms/tenants/<t>/...)
        return ApiError(
            429, exc.error.message, type="insufficient_quota", code="insufficient_quota"
        )
    if code == "forbidden":
        return ApiError(403, exc.error.message, code=code)
    return ApiError(502, str(exc), type="server_error", code=code)
