"""The cloud fallback: an OpenAI-compatible chat-completions client over httpx.

A call that times out, cannot connect, gets 429 or 5xx, or gets a body that is not a chat
completion is retried `retries` times with exponential backoff (a 429's Retry-After is
honoured up to `backoff_max_s`); then, or at once for other 4xx answers, it raises
`CloudError`. The API key is a SecretStr: it goes into the Authorization header and nowhere
else (not into logs, errors or reprs).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from services.core.errors import EdgecollabError
from services.scheduling.outcomes import Prices

log = structlog.get_logger(__name__)


class CloudSettings(BaseModel):
    """Where and how to call the cloud LLM, and what it costs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field("https://api.openai.com/v1", description="up to, not including, /chat")
    api_key: SecretStr | None = None
    model: str = "gpt-4"
    timeout_s: float = Field(30.0, gt=0, description="per attempt")
    retries: int = Field(2, ge=0, description="attempts after the first")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each time")
    backoff_max_s: float = Field(8.0, ge=0)
    prices: Prices = Prices()


@dataclass(frozen=True, slots=True)
class CloudReply:
    """One answer from the cloud, with its token usage and price."""

    text: str
    prompt_tokens: int
    output_tokens: int
    cost_usd: float
    ms: float
    attempts: int = 1


class CloudError(EdgecollabError):
    """The cloud gave no usable answer; `attempts` were made, the last failing with `reason`."""

    def __init__(self, reason: str, *, attempts: int, status: int | None = None) -> None:
        super().__init__(f"cloud failed after {attempts} attempt(s): {reason}")
        self.reason, self.attempts, self.status = reason, attempts, status


class _Retryable(Exception):
    def __init__(self, reason: str, status: int | None = None, delay_s: float | None = None):
        super().__init__(reason)
        self.reason, self.status, self.delay_s = reason, status, delay_s


class _Message(BaseModel):
    content: str


class _Choice(BaseModel):
    message: _Message


class _Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class _Completion(BaseModel):
    """The part of a chat-completion body we rely on."""

    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage


class CloudClient:
    """Calls one OpenAI-compatible endpoint; use as `async with CloudClient(settings) as cloud`."""

    def __init__(self, settings: CloudSettings, *, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self._client = client or httpx.AsyncClient(timeout=settings.timeout_s)
        self._owns_client = client is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int,
        temperature: float | None = None,
        request_id: str | None = None,
    ) -> CloudReply:
        """One chat completion, retried as the module says; raises CloudError."""
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": list(messages),
            "max_tokens": max_tokens,
        }
        if temperature is not None:
            body["temperature"] = temperature
        start = time.perf_counter()

        def warn(state: RetryCallState) -> None:
            e = state.outcome.exception() if state.outcome else None
            assert isinstance(e, _Retryable) and state.next_action is not None
            log.warning(
                "cloud.retry", request_id=request_id, attempt=state.attempt_number,
                reason=e.reason, status=e.status, delay_s=round(state.next_action.sleep, 3),
            )  # fmt: skip

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retries + 1),
            wait=self._backoff,
            retry=retry_if_exception_type(_Retryable),
            before_sleep=warn,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    completion = await self._attempt(body)
        except _Retryable as e:
            attempts = retrying.statistics["attempt_number"]
            raise CloudError(e.reason, attempts=attempts, status=e.status) from None
        return self._reply(completion, start, attempt.retry_state.attempt_number, request_id)

    async def _attempt(self, body: dict[str, Any]) -> _Completion:
        url = self.settings.base_url.rstrip("/") + "/chat/completions"
        try:
            response = await self._client.post(url, json=body, headers=self._headers())
        except httpx.TimeoutException:
            raise _Retryable(f"timed out after {self.settings.timeout_s} s") from None
        except httpx.TransportError as e:
            raise _Retryable(f"transport error: {type(e).__name__}") from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}", status, _retry_after(response))
        if status >= 400:
            raise CloudError(f"HTTP {status}: {response.text[:200]}", attempts=1, status=status)
        try:
            return _Completion.model_validate_json(response.content)
        except ValidationError:
            raise _Retryable(f"HTTP {status} with a body that is not a chat completion") from None

    def _headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}

    def _backoff(self, state: RetryCallState) -> float:
        """Doubling from backoff_s, at least the server's Retry-After, at most backoff_max_s."""
        delay = self.settings.backoff_s * 2 ** (state.attempt_number - 1)
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, _Retryable) and failure.delay_s is not None:
            delay = max(delay, failure.delay_s)
        return min(delay, self.settings.backoff_max_s)

    def _reply(
        self, completion: _Completion, start: float, attempts: int, request_id: str | None
    ) -> CloudReply:
        usage = completion.usage
        reply = CloudReply(
            text=completion.choices[0].message.content,
            prompt_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            cost_usd=self.settings.prices.cost(usage.prompt_tokens, usage.completion_tokens),
            ms=(time.perf_counter() - start) * 1000,
            attempts=attempts,
        )
        log.info(
            "cloud.reply", request_id=request_id, attempts=attempts, ms=round(reply.ms, 1),
            prompt_tokens=reply.prompt_tokens, output_tokens=reply.output_tokens,
            cost_usd=round(reply.cost_usd, 6),
        )  # fmt: skip
        return reply


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header given in seconds (dates are ignored)."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None
