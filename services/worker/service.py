"""The SLM worker service: tasks on computation/tasks/<agent>, questions on knowledge/<domain>/ask.

At its concurrency limit it answers a task with `Rejected` at once. Decoding parameters come
from the request, then from cms/parameters/<model>/..., then the model's measured defaults
(services/worker/parameters.py), which it publishes there where no operator set a value; a
request writes at most cms/configs/<model>/max_tokens tokens. It publishes what its generations
cost, tasks and expert answers together: cms/metrics/<agent>/inference_time_avg (seconds per
request) and .../tokens_used_total (tokens written).
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
from services.core.configs import LiveConfigs
from services.core.errors import BadInput
from services.core.presence import Presence
from services.core.topics import KNOWLEDGE, METRIC, MODEL_DETAIL, REPLIES, STREAM, TASKS
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
        self.model = backend.model.name if backend.model else "emulated"
        self.view = view
        self.parameters = LiveParameters(bus, view, model=self.model)
        self.configs = LiveConfigs(bus, view, reads=("max_tokens",), model=self.model)
        self.served, self.seconds, self.tokens = 0, 0.0, 0  # for cms/metrics/<agent>/...
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._by_requester: dict[str, set[asyncio.Task[object]]] = {}
        view.on_change(self._on_change)
        bus.serve(TASKS, self.handle_task, agent=agent)
        for domain in domains:
            bus.serve(KNOWLEDGE, self.handle_knowledge, shared=f"knowledge-{domain}", domain=domain)
        if backend.model is not None:
            bus.on_connect(self.parameters.publish_defaults)  # before the card: seen first
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
        if task.resume is not None:  # the answer is what the requester was sent, then ours
            text = task.resume.text + text
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
            confidence=stats.confidence,
        )

    async def publish_model_card(self) -> None:
        """What the model is, under cms/slm/<model>/<field> (the same for every replica)."""
        model = self.backend.model
        assert model is not None
        details = model.model_dump(exclude={"name", "version"}, exclude_none=True)
        for field, value in details.items():
            key = MODEL_DETAIL.format(model=model.name, field=field)
            await cms.put(self.bus, key, value, version=1)

    async def publish_metrics(self, *, base_version: int, interval_s: float = 5.0) -> None:
        """cms/metrics/<agent>/inference_time_avg and .../tokens_used_total, every
        `interval_s` while they change (and again after a reconnect). Versions continue the
        agent's own (epoch x 10^6 + n), so a restarted worker's first values supersede."""
        version, last = base_version, -1

        async def republish() -> None:
            nonlocal last
            last = -1

        self.bus.on_connect(republish)
        while True:
            await asyncio.sleep(interval_s)
            if self.served == last or not self.bus.connected.is_set():
                continue
            version, last = version + 1, self.served
            average = self.seconds / self.served if self.served else 0.0
            for name, value in (
                ("inference_time_avg", round(average, 6)),
                ("tokens_used_total", self.tokens),
            ):
                key = METRIC.format(scope=self.agent, name=name)
                await cms.put(self.bus, key, value, version=version)

    async def _generate(
        self, task: Task, emit: Callable[[str], Awaitable[None]] | None
    ) -> tuple[str, GenerationStats]:
        sampling: SamplingOptions = self.parameters.resolve(task.sampling)
        cap = self.configs.get("max_tokens", self.model)
        if cap is not None and task.max_tokens > cap:
            task = task.model_copy(update={"max_tokens": cap})
        self.active += 1
        self._changed()
        started = time.perf_counter()
        try:
            text, stats = await self.backend.generate(task, sampling, emit)
        finally:
            self.active -= 1
            self._changed()
        self._recent.append((time.monotonic(), stats.output_tokens))
        self.served += 1
        self.seconds += time.perf_counter() - started
        self.tokens += stats.output_tokens
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
        seq = task.resume.seq if task.resume is not None else 0

        async def emit(text: str) -> None:
            nonlocal seq
            chunk = TokenChunk(
                request_id=task.request_id, agent=self.agent, seq=seq, text=text,
                attempt=task.attempt,
            )  # fmt: skip
            seq += 1
            await self.bus.publish(topic, chunk)

        return emit
