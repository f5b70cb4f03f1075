"""Data and knowledge steps of a plan.

Data: the orchestrator mirrors every sensor's readings (a DataView of data/...), so a data step
waits for a reading of its sensor newer than the plan's start (a device discovered from its
data: one at most `max_age_s` older), then summarises it and takes its facts (the measured
values the answer states); a sensor that died makes the step fail at its deadline.
Knowledge: an expert peer answers on knowledge/<domain>/ask; answers are cached under
cms/cache/<hash> with an expiry. A knowledge base answers on knowledge/<domain>/retrieve with
the passages nearest the question (those scoring at least MIN_SCORE) and the reference ranges
of the step's streams; the models read them as the step's output. A lexicon says on
knowledge/<domain>/check which of several answers its entries support.
"""

from __future__ import annotations

import hashlib
import time

from schemas import (
    CachedAnswer,
    Check,
    Checked,
    Fact,
    KnowledgeAnswer,
    KnowledgeQuery,
    Passage,
    Passages,
    Retrieve,
    SamplingOptions,
    Step,
)
from services.core import cms
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, PeerGone, RemoteError
from services.core.topics import CACHE, KB_CHECK, KB_RETRIEVE, KNOWLEDGE, READING
from services.data.grounding import reference
from services.data.view import DataView
from services.orchestrator.planner import PlanStep
from services.orchestrator.provenance import record

RETRIEVE_K = 3  # passages near the question
# Below it a passage is seldom about the question: `edgecollab bench kb` measured the right
# passage at 0.47-0.81 and off-topic questions' nearest at 0.07-0.24.
MIN_SCORE = 0.3
RETRIEVE_S = 2.0  # a knowledge base answers within this, or the plan goes on without it
CHECK_S = 3.0  # a lexicon judges within this (it embeds the entries it had not seen)


class Cooperation:
    """Runs data and knowledge steps; counts knowledge cache hits and misses."""

    def __init__(
        self, *, bus: Bus, view: CmsView, data: DataView, cache_ttl_s: float = 600.0
    ) -> None:
        self.bus = bus
        self.view = view
        self.data = data
        self.cache_ttl_s = cache_ttl_s
        self.cache_hits = 0
        self.cache_misses = 0

    async def sense(
        self, step: PlanStep, since: float, deadline: float
    ) -> tuple[str | None, Step, list[Fact]]:
        """A summary of the sensor's readings newer than `since` (less the step's `max_age_s`)
        and their facts, or a failed step and no facts."""
        assert step.agent is not None and step.domain is not None
        topic = READING.filter(domain=step.domain, agent=step.agent)
        started = time.perf_counter()
        agent, after = step.agent, since - (step.max_age_s or 0.0)
        fresh = await self.data.changes.until(
            lambda: (self.data.last_seen(agent) or 0.0) >= after, timeout=deadline - time.time()
        )
        if not fresh:
            detail = f"no fresh reading from {agent} before the step's deadline"
            return None, record(step.name, topic, agent, started, "failed", detail=detail), []
        summary = self.data.summary(step.domain, agents=[agent])
        facts = self.data.facts(step.domain, agents=[agent])
        found = "discovered from its readings" if step.max_age_s is not None else None
        return summary, record(step.name, topic, agent, started, "ok", detail=found), facts

    async def ask(
        self,
        step: PlanStep,
        question: str,
        *,
        request_id: str,
        deadline: float,
        sampling: SamplingOptions | None = None,
    ) -> tuple[str | None, Step]:
        """An expert's answer: from the cache when a fresh one is there, else asked for."""
        assert step.domain is not None
        key = CACHE.format(key=cache_key(step.domain, question))
        started = time.perf_counter()
        hit = self.view.value(key, CachedAnswer)
        if hit is not None and hit.expires_at > time.time():
            self.cache_hits += 1
            return hit.answer, record(step.name, key, hit.agent, started, "cached")
        self.cache_misses += 1
        topic = KNOWLEDGE.format(domain=step.domain)
        query = KnowledgeQuery(
            request_id=f"{request_id}.{step.domain}",
            domain=step.domain,
            question=question[:8000],
            asker=self.bus.client_id,
            max_tokens=step.max_tokens,
            deadline=deadline,
            sampling=sampling or SamplingOptions(),
        )
        try:
            reply = await self.bus.request(topic, query, deadline=deadline)
        except (DeadlineExceeded, RemoteError, PeerGone) as exc:  # PeerGone: nobody subscribed
            return None, record(step.name, topic, None, started, "failed", detail=str(exc))
        assert isinstance(reply, KnowledgeAnswer)
        await self._remember(key, reply)
        tokens = reply.output_tokens
        return reply.answer, record(
            step.name, topic, reply.agent, started, "ok", output_tokens=tokens,
            confidence=reply.confidence,
        )  # fmt: skip

    async def retrieve(
        self, step: PlanStep, question: str, *, request_id: str, deadline: float
    ) -> tuple[str | None, Step, list[Passage]]:
        """Passages of the step's domain for the question (and its streams' reference
        ranges): their text for the models, the record, the passages."""
        assert step.domain is not None
        topic = KB_RETRIEVE.format(domain=step.domain)
        started = time.perf_counter()
        ask = Retrieve(
            request_id=f"{request_id}.kb",
            domain=step.domain,
            text=question[:2000],
            k=RETRIEVE_K,
            min_score=MIN_SCORE,
            streams=list(step.streams),
            deadline=min(deadline, time.time() + RETRIEVE_S),
        )
        try:
            reply = await self.bus.request(topic, ask, deadline=ask.deadline)
        except (DeadlineExceeded, RemoteError, PeerGone) as exc:
            return None, record(step.name, topic, None, started, "failed", detail=str(exc)), []
        assert isinstance(reply, Passages)
        lines = [
            f"[{p.cite}] {p.title}: {p.text}" if p.matched == "text" else
            f"[{p.cite}] {p.title}: {reference(p)}"
            for p in reply.passages
        ]  # fmt: skip
        near = [p for p in reply.passages if p.matched == "text"]
        detail = "; ".join(f"[{p.cite}] {p.title} ({p.score:.2f})" for p in near)
        done = record(
            step.name, topic, reply.agent, started, "ok",
            detail=detail or "no passage near the question",
        )  # fmt: skip
        return "\n".join(lines) or None, done, list(reply.passages)

    async def check(
        self,
        domain: str,
        question: str,
        answers: list[tuple[str, str]],
        *,
        request_id: str,
        deadline: float,
    ) -> tuple[int | None, Step]:
        """Which of `answers` ((who, text) pairs) the domain's lexicon supports (None: it cannot
        tell, or failed), and the record, whose detail names each one's evidence by its who."""
        topic = KB_CHECK.format(domain=domain)
        started = time.perf_counter()
        ask = Check(
            request_id=f"{request_id}.check",
            domain=domain,
            question=question[:2000],
            answers=[text[:8000] for _, text in answers],
            deadline=min(deadline, time.time() + CHECK_S),
        )
        name = f"check:{domain}"
        try:
            reply = await self.bus.request(topic, ask, deadline=ask.deadline)
        except (DeadlineExceeded, RemoteError, PeerGone) as exc:
            return None, record(name, topic, None, started, "failed", detail=str(exc))
        assert isinstance(reply, Checked)
        said = "; ".join(f"{answers[e.answer][0]}'s {e.term!r} ({e.score:.2f}, {e.source})"
                         for e in reply.evidence if e.answer < len(answers))  # fmt: skip
        detail = f"{reply.reason}; {said}" if said else reply.reason
        return reply.best, record(name, topic, reply.agent, started, "ok", detail=detail)

    async def _remember(self, key: str, reply: KnowledgeAnswer) -> None:
        value = CachedAnswer(
            answer=reply.answer,
            agent=reply.agent,
            domain=reply.domain,
            expires_at=time.time() + self.cache_ttl_s,
        )
        current = self.view.get(key)
        version = current.version + 1 if current else 1
        await cms.put(self.bus, key, value.model_dump(), version=version, expiry_s=self.cache_ttl_s)


def cache_key(domain: str, question: str) -> str:
    """A stable key for a question to a domain (whitespace and case do not matter)."""
    normal = " ".join(question.lower().split())
    return hashlib.sha256(f"{domain}\n{normal}".encode()).hexdigest()[:32]
