"""The SLM worker service: takes tasks on computation/tasks/<agent>, rejects at its limit."""

from __future__ import annotations

import collections
import time

import structlog

from schemas import Rejected, Task, TaskResult, TokenChunk
from services.core.bus import Bus, Request
from services.core.presence import Presence
from services.core.topics import STREAM, TASKS
from services.worker.backend import Backend

log = structlog.get_logger("edgecollab.worker")

_RATE_WINDOW_S = 5.0


class Worker:
    """Serves tasks with one backend; at its concurrency limit it answers `Rejected` at once."""

    def __init__(
        self, *, bus: Bus, agent: str, backend: Backend, presence: Presence | None = None
    ) -> None:
        self.bus = bus
        self.agent = agent
        self.backend = backend
        self.presence = presence
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        bus.serve(TASKS, self.handle_task, agent=agent)

    def load(self) -> tuple[int, int, float]:
        """(active, queued, recent tokens/s) for the status."""
        cutoff = time.monotonic() - _RATE_WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return self.backend.active, 0, sum(n for _, n in self._recent) / _RATE_WINDOW_S

    async def handle_task(self, request: Request[Task]) -> TaskResult | Rejected:
        task = request.body
        if self.backend.active >= self.backend.concurrency:
            return Rejected(
                task_id=task.task_id,
                agent=self.agent,
                reason="at concurrency limit",
                active=self.backend.active,
                limit=self.backend.concurrency,
            )
        started = time.perf_counter()
        self._changed()
        try:
            emit = self._streamer(task) if task.stream else None
            result = await self.backend.generate(task, emit)
        finally:
            self._changed()
        self._recent.append((time.monotonic(), result.output_tokens))
        return TaskResult(
            task_id=task.task_id,
            agent=self.agent,
            text=result.text,
            prompt_tokens=result.prompt_tokens,
            output_tokens=result.output_tokens,
            prefill_ms=round(result.prefill_ms, 3),
            decode_tok_s=round(result.decode_tok_s, 2),
            ms=round((time.perf_counter() - started) * 1000, 3),
            finish_reason=result.finish_reason,
        )

    def _changed(self) -> None:
        if self.presence is not None:
            self.presence.changed()

    def _streamer(self, task: Task):  # type: ignore[no-untyped-def]
        topic = STREAM.format(request=task.request_id)
        seq = 0

        async def emit(text: str) -> None:
            nonlocal seq
            chunk = TokenChunk(request_id=task.request_id, agent=self.agent, seq=seq, text=text)
            seq += 1
            await self.bus.publish(topic, chunk, qos=0)

        return emit
