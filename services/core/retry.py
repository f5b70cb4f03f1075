"""Retrying with exponential backoff: the one policy for reaching the broker (tenacity)."""

from __future__ import annotations

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from services.core.connection import ConnectionLost

log = structlog.get_logger("edgecollab.retry")

BROKER_BACKOFF_MAX_S = 5.0


def until_reachable(event: str, *, first_s: float, **context: object) -> AsyncRetrying:
    """Retry on ConnectionLost or a timeout, forever: first_s, then doubling up to 5 s."""

    def warn(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        reason = str(failure) or type(failure).__name__ if failure else "unknown"
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(event, reason=reason, retry_s=round(delay, 2), **context)

    return AsyncRetrying(
        retry=retry_if_exception_type((ConnectionLost, TimeoutError)),
        wait=wait_exponential(multiplier=first_s, min=first_s, max=BROKER_BACKOFF_MAX_S),
        before_sleep=warn,
        reraise=True,
    )
