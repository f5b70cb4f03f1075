"""The SLM worker service: tasks on computation/tasks/<agent>, questions on knowledge/<domain>/ask.

At its concurrency limit it answers a task with `Rejected` at once. Decoding parameters come
from the request, then from cms/parameters/<model>/..., then the defaults.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

import structlog

from schemas import (
    CmsEntry,
    GenerationStats,
    KnowledgeAnswer,
    KnowledgeQuery,
    Rejected,
    SamplingOptions,
    Task,
    TaskResult,
    TokenChunk,
)
from services.core import cms
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.errors import BadInput
from services.core.presence import Presence
from services.core.topics import KNOWLEDGE, MODEL_DETAIL, REPLIES, STREAM, TASKS
from services.worker.backend import Backend
from services.worker.parameters import LiveParameters

log = structlog.get_logger("edgecollab.worker")

_RATE_WINDOW_S = 5.0
EXPERT_PROMPT = (
    "You are an expert in {domain}. Answer the question accurately and concisely, with the key "
    "facts another assistant needs."
)


class Worker:
    """Serves one backend: tasks addressed to this agent, and its domains' knowledge questions."""

    def __init__(
        self,
        *,
        bus: Bus,
        agent: str,
        backend: Backend,
        view: CmsView,
        presence: Presence | None = None,
        domains: tuple[str, ...] = (),
    ) -> None:
        self.bus = bus
        self.agent = agent
        self.backend = backend
        self.presence = presence
        self.active = 0  # requests in flight here: counted on the event loop, so exact
        model = backend.model.name if backend.model else "emulated"
        self.view = view
        self.parameters = LiveParameters(bus, view, model=model)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._by_requester: dict[str, set[asyncio.Task[object]]] = {}
        view.on_change(self._on_change)
        bus.serve(TASKS, self.handle_task, agent=agent)
        for domain in domains:
            bus.serve(KNOWLEDGE, self.handle_knowledge, shared=f"knowledge-{domain}", domain=domain)
        if backend.model is not None:
            bus.on_connect(self.publish_model_card)

    def load(self) -> tuple[int, int, float]:
        """(active, queued, recent tokens/s) for the status."""
        cutoff = time.monotonic() - _RATE_WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return self.active, self.backend.queued, sum(n for _, n in self._recent) / _RATE_WINDOW_S

    @property
    def full(self) -> bool:
        return self.active >= self.backend.concurrency

    async def handle_task(self, request: Request[Task]) -> TaskResult | Rejected:
        task = request.body
        if self.full:
            return Rejected(
                task_id=task.task_id,
                agent=self.agent,
                reason="at concurrency limit",
                active=self.active,
                limit=self.backend.concurrency,
            )
        started = time.perf_counter()
        with self._serving(request.reply_to):
            text, stats = await self._generate(task, self._streamer(task) if task.stream else None)
        return TaskResult(
            task_id=task.task_id,
            agent=self.agent,
            text=text,
            ms=round((time.perf_counter() - started) * 1000, 3),
            **stats.model_dump(),
        )

    async def handle_knowledge(self, request: Request[KnowledgeQuery]) -> KnowledgeAnswer:
        query = request.body
        if self.full:
            raise BadInput("unavailable", f"{self.agent} is at its concurrency limit")
        started = time.perf_counter()
        task = Task(
            task_id=f"{query.request_id}.knowledge",
            request_id=query.request_id,
            prompt=query.question,
            system=EXPERT_PROMPT.format(domain=query.domain),
            max_tokens=query.max_tokens,
            deadline=query.deadline,
            sampling=query.sampling,
        )
        text, stats = await self._generate(task, None)
        return KnowledgeAnswer(
            request_id=query.request_id,
            agent=self.agent,
            domain=query.domain,
            answer=text.strip(),
            output_tokens=stats.output_tokens,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )

    async def publish_model_card(self) -> None:
        """What the model is, under cms/slm/<model>/<field> (the same for every replica)."""
        model = self.backend.model
        assert model is not None
        for field, value in model.model_dump(exclude={"name"}, exclude_none=True).items():
            key = MODEL_DETAIL.format(model=model.name, field=field)
            await cms.put(self.bus, key, value, version=1)

    async def _generate(
        self, task: Task, emit: Callable[[str], Awaitable[None]] | None
    ) -> tuple[str, GenerationStats]:
        sampling: SamplingOptions = self.parameters.resolve(task.sampling)
        self.active += 1
        self._changed()
        try:
            text, stats = await self.backend.generate(task, sampling, emit)
        finally:
            self.active -= 1
            self._changed()
        self._recent.append((time.monotonic(), stats.output_tokens))
        return text, stats

    @contextlib.contextmanager
    def _serving(self, reply_to: str | None) -> Iterator[None]:
        """Remember whose task this is, so that its requester's death cancels it."""
        params = REPLIES.match(reply_to) if reply_to else None
        requester = params["client"] if params else None
        task = asyncio.current_task()
        tasks = self._by_requester.setdefault(requester, set()) if requester else None
        if tasks is not None and task is not None:
            tasks.add(task)
        try:
            yield
        finally:
            if tasks is not None and task is not None:
                tasks.discard(task)

    def _on_change(self, key: str, entry: CmsEntry | None) -> None:
        """A requester that went offline will take no result: free its slots now."""
        gone = self.view.went_offline(key)
        for task in self._by_requester.pop(gone, set()) if gone else ():
            log.info("task.cancelled", requester=gone, reason="requester offline")
            task.cancel()

    def _changed(self) -> None:
        if self.presence is not None:
            self.presence.changed()

    def _streamer(self, task: Task) -> Callable[[str], Awaitable[None]] | None:
        if task.client is None:  # whose stream it is is unknown: nobody could read it
            return None
        topic = STREAM.format(client=task.client, request=task.request_id)
        seq = 0

        async def emit(text: str) -> None:
            nonlocal seq
            chunk = TokenChunk(request_id=task.request_id, agent=self.agent, seq=seq, text=text)
            seq += 1
            await self.bus.publish(topic, chunk)

        return emit
