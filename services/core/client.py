"""Asking the edge cluster a question so that it is answered, or refused with a reason.

A query is never lost in silence: when no orchestrator is subscribed, the broker says so at
once (PUBACK 0x10) and the client retries with backoff; when the orchestrator that accepted
the query goes offline (its Last Will), the client sends it again with the same request id;
past the deadline it raises DeadlineExceeded naming what it tried.
"""

from __future__ import annotations

import time

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from schemas import Answer, CmsEntry, Query
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, NoSubscriber, PeerGone
from services.core.topics import QUERIES
from services.core.transcript import Transcript

log = structlog.get_logger("edgecollab.client")

# A live orchestrator says Accepted within milliseconds; one that says nothing this long was
# killed or frozen with the query, which then goes to another.
ACCEPT_S = 3.0


class QueryClient:
    """Sends Queries on `computation/queries`; the CMS view tells it which agents go offline
    (a bus delivers each message to one route, so the client shares the process's view)."""

    def __init__(self, bus: Bus, view: CmsView) -> None:
        self.bus, self.view = bus, view
        self.retries = 0  # queries sent again (nobody subscribed, or their orchestrator died)
        view.on_change(self._on_change)

    async def ask(self, query: Query, transcript: Transcript | None = None) -> Answer:
        """The Answer to `query`; raises DeadlineExceeded (or RemoteError for a refusal).
        A streamed query's `transcript` (what its stream has shown) goes with a resend, so
        the next orchestrator continues the stream rather than starting it again."""
        query = query.model_copy(update={"ack": True})
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(PeerGone),
            wait=_wait,
            before_sleep=lambda state: self._retried(query, state),
            reraise=True,
        )
        async for attempt in retrying:  # retries until an answer, an Error or the deadline
            with attempt:
                if time.time() >= query.deadline:
                    raise DeadlineExceeded(f"{query.request_id}: deadline passed")
                if transcript is not None and attempt.retry_state.attempt_number > 1:
                    query = query.model_copy(update={"resume": transcript.hand_over()})
                answer = await self.bus.request(
                    QUERIES.format(), query, deadline=query.deadline, accept_within_s=ACCEPT_S
                )
        assert isinstance(answer, Answer)
        return answer

    def _retried(self, query: Query, state: RetryCallState) -> None:
        self.retries += 1
        reason = state.outcome.exception() if state.outcome else None
        log.info("query.retry", request_id=query.request_id, reason=str(reason))

    def _on_change(self, key: str, entry: CmsEntry | None) -> None:
        if (gone := self.view.went_offline(key)) is not None:
            self.bus.abandon(gone)  # queries it accepted are sent again


def _wait(state: RetryCallState) -> float:
    """At once when the orchestrator that had the query died (another one is up, or will be);
    with backoff, 0.1 s doubling to 2 s, while nobody is subscribed at all."""
    failure = state.outcome.exception() if state.outcome else None
    if isinstance(failure, NoSubscriber):
        return min(2.0, 0.1 * 2 ** (state.attempt_number - 1))
    return 0.0
