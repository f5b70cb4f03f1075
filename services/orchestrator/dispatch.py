"""One generation step: allocate by policy, dispatch to an edge worker, else the cloud."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from schemas import (
    CmsEntry,
    Rejected,
    Resume,
    SamplingOptions,
    Step,
    Task,
    TaskResult,
    TokenChunk,
)
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, PeerGone, RemoteError
from services.core.topics import AGENT_STATUS, REMOTE_AGENT_STATUS, REMOTE_TASKS, STREAM, TASKS
from services.core.transcript import Transcript
from services.orchestrator.allocator import Allocator, Grant
from services.orchestrator.cloud import CloudClient, CloudError
from services.orchestrator.provenance import record
from services.scheduling.lengths import CLOUD_MODEL
from services.scheduling.outcomes import Outcome
from services.scheduling.policies import Demand

log = structlog.get_logger("edgecollab.dispatch")


@dataclass(frozen=True, slots=True)
class Job:
    """What to generate, for which request, by when."""

    request_id: str
    name: str  # the plan step
    prompt: str
    max_tokens: int
    deadline: float
    stream: bool = False
    resume: Resume | None = None  # what the requester's stream has shown already

    @property
    def attempts_before(self) -> int:
        """Attempts an earlier orchestrator made of this stream (their chunks are not heard)."""
        return self.resume.attempt if self.resume else 0

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    domain: str | None = None  # the Classifier Engine's labels: what predicts its length
    difficulty: str | None = None
    client: str | None = None  # the requester, whose streams these tokens are


@dataclass(slots=True)
class Generated:
    """A generation's text (None when nobody served it), how it ended, and its steps."""

    text: str | None
    outcome: Outcome
    steps: list[Step] = field(default_factory=list)
    confidence: float | None = None  # the worker's knowledge-gap signal (None: not measured)


CONTINUE = "Continue your answer exactly where it stopped, without repeating any of it."


def estimate_tokens(text: str) -> int:
    """Prompt tokens before any tokenizer sees the text (~4 characters a token)."""
    return max(1, round(len(text) / 4))


class Dispatcher:
    """Edge first, by policy; the cloud for what the edge does not serve."""

    def __init__(
        self, *, bus: Bus, view: CmsView, allocator: Allocator, cloud: CloudClient | None
    ) -> None:
        self.bus = bus
        self.view = view
        self.allocator = allocator
        self.cloud = cloud
        self._heard: dict[str, float] = {}  # when each agent's status last came (monotonic)
        self._streamed: dict[str, Transcript] = {}  # what requesters of streamed jobs were sent
        view.on_change(self._on_cms_change)
        bus.listen(STREAM, self._on_chunk)

    async def run(self, job: Job) -> Generated:
        """The policy's agent first; a task it rejects, fails or dies on goes to another
        agent with a free slot (each agent tried once) while the deadline allows, then the
        cloud. Every attempt is a step of the answer's provenance. A streamed answer cut off
        by a failure is continued by the next one, from what its requester was sent."""
        if not job.stream:
            return await self._run(job)
        self._streamed[job.request_id] = transcript = Transcript(job.resume)
        transcript.supersede(job.attempts_before + 1)  # an earlier orchestrator's are not heard
        try:
            return await self._run(job)
        finally:  # a query sent again may be run here twice at once: the later owns the stream
            if self._streamed.get(job.request_id) is transcript:
                del self._streamed[job.request_id]

    async def _run(self, job: Job) -> Generated:
        demand = self.allocator.demand(
            prompt_tokens=estimate_tokens(job.prompt),
            max_tokens=job.max_tokens,
            domain=job.domain,
            difficulty=job.difficulty,
        )
        grant = await self.allocator.acquire(demand)
        if grant.agent is None and grant.reason == "cloud":
            return await self._cloud(job, [], Outcome.CLOUD, demand)
        steps: list[Step] = []
        tried: set[str | None] = set()
        while grant.agent is not None:
            tried.add(grant.key)
            result: TaskResult | None = None
            try:
                step, result = await self.dispatch(
                    grant.agent, job, attempt=job.attempts_before + len(tried), site=grant.site
                )
            finally:
                self.allocator.release(grant, demand, result)  # a whole answer's length is learned
            steps.append(step)
            if result is not None:
                return Generated(result.text, Outcome.EDGE, steps, result.confidence)
            if time.time() >= job.deadline:
                return Generated(None, Outcome.FAILED, steps)
            grant = await self._another(demand, tried)
        if not steps:
            steps.append(
                record(job.name, "-", None, None, "rejected", where="none", detail=grant.reason)
            )
        return await self._cloud(job, steps, Outcome.REJECTED_TO_CLOUD, demand)

    async def _another(self, demand: Demand, tried: set[str | None]) -> Grant:
        """A free slot elsewhere at once, else whatever the policy would wait for, if that is
        not an agent already tried."""
        grant = self.allocator.acquire_free(demand, exclude=tried)
        if grant.agent is not None:
            return grant
        grant = await self.allocator.acquire(demand)
        if grant.key in tried:
            self.allocator.release(grant, demand)
            return Grant(None, f"full: only {grant.key}, tried already, has room")
        return grant

    async def dispatch(
        self, agent: str, job: Job, *, attempt: int = 1, site: str | None = None
    ) -> tuple[Step, TaskResult | None]:
        """Send a task to one worker (of the neighbour `site`: through this site's replicator,
        not streamed); a reject, an error, a deadline or a death is a Step too. Each attempt
        has its own task id, so a late result of an abandoned one is ignored."""
        if site is None:
            topic, peer = TASKS.format(agent=agent), agent
        else:
            topic, peer = REMOTE_TASKS.format(site=site, agent=agent), f"{site}/{agent}"
        suffix = "" if attempt == 1 else f".{attempt}"
        resume = self._take_over(job.request_id, attempt)
        task = Task(
            task_id=f"{job.request_id}.{job.name}{suffix}",
            request_id=job.request_id,
            prompt=job.prompt,
            max_tokens=job.max_tokens,
            deadline=job.deadline,
            stream=job.stream and site is None,
            sampling=job.sampling,
            client=job.client,
            attempt=attempt,
            resume=resume,
        )
        resumed = f"continued after {resume.seq} streamed chunks" if resume else None
        started = time.perf_counter()
        try:
            reply = await self.bus.request(topic, task, deadline=task.deadline, peer=peer)
        except (DeadlineExceeded, RemoteError, PeerGone) as exc:
            step = record(job.name, topic, agent, started, "failed", site=site, detail=str(exc))
            return step, None
        if isinstance(reply, Rejected):
            detail = f"{peer} rejected: {reply.reason} ({reply.active}/{reply.limit})"
            step = record(job.name, topic, agent, started, "rejected", site=site, detail=detail)
            return step, None
        assert isinstance(reply, TaskResult)
        step = record(
            job.name, topic, agent, started, "ok", site=site, detail=resumed,
            prompt_tokens=reply.prompt_tokens, output_tokens=reply.output_tokens,
            confidence=reply.confidence,
        )  # fmt: skip
        return step, reply

    def _take_over(self, request_id: str, attempt: int) -> Resume | None:
        """Attempt `attempt` now owns the stream; where it starts from (None: afresh)."""
        transcript = self._streamed.get(request_id)
        if transcript is None:
            return None
        transcript.supersede(attempt)
        return transcript.resume()

    def _on_chunk(self, request: Request[TokenChunk]) -> None:
        if (transcript := self._streamed.get(request.body.request_id)) is not None:
            transcript.add(request.body)

    async def _cloud(
        self, job: Job, steps: list[Step], outcome: Outcome, demand: Demand
    ) -> Generated:
        """The cloud serves what the edge did not; without a cloud the request is refused."""
        if self.cloud is None:
            edge_failed = bool(steps) and steps[-1].outcome == "failed"
            return Generated(None, Outcome.FAILED if edge_failed else Outcome.REJECTED, steps)
        started, topic = time.perf_counter(), f"cloud:{self.cloud.settings.model}"
        messages = [{"role": "user", "content": job.prompt}]
        last = job.attempts_before + len(steps) + 1
        sent = self._take_over(job.request_id, last)  # edge chunks no longer count
        if sent is not None:  # the requester has the start of an answer: the cloud finishes it
            messages += [
                {"role": "assistant", "content": sent.text},
                {"role": "user", "content": CONTINUE},
            ]
        try:
            reply = await self.cloud.complete(
                messages,
                max_tokens=job.max_tokens,
                temperature=job.sampling.temperature,
                request_id=job.request_id,
            )
        except CloudError as exc:
            steps.append(
                record(job.name, topic, None, started, "failed", where="cloud", detail=str(exc))
            )
            return Generated(None, Outcome.FAILED, steps)
        self.allocator.learn(demand, reply.output_tokens, "stop", CLOUD_MODEL)  # a whole answer
        steps.append(
            record(
                job.name, topic, None, started, "ok", where="cloud", cost_usd=reply.cost_usd,
                prompt_tokens=reply.prompt_tokens, output_tokens=reply.output_tokens,
            )
        )  # fmt: skip
        return Generated((sent.text if sent else "") + reply.text, outcome, steps)

    def _on_cms_change(self, key: str, entry: CmsEntry | None) -> None:
        if (params := AGENT_STATUS.match(key)) is not None:
            self._heard[params["agent"]] = time.monotonic()
        if (gone := self.view.went_offline(key)) is not None:
            self.bus.abandon(gone)  # its requests in flight fail now, not at deadline
        elif (params := REMOTE_AGENT_STATUS.match(key)) is not None:
            site, agent = params["site"], params["agent"]
            found = self.view.remote_agent(site, agent)
            if found is None or not found.online:
                self.bus.abandon(f"{site}/{agent}")

    async def watch_silence(self, *, silent_after_s: float) -> None:
        """A worker whose status (sent twice per keepalive) has not come for `silent_after_s`
        is frozen or cut off: new work avoids it and its tasks go elsewhere, now rather than
        when the broker's keepalive (1.5x) fires its Last Will. Its next status brings it back."""
        while True:
            await asyncio.sleep(silent_after_s / 4)
            now = time.monotonic()
            for agent in list(self.allocator.fleet.agents):
                if now - self._heard.get(agent, now) > silent_after_s:
                    log.warning(
                        "worker.silent", agent=agent, silent_s=round(now - self._heard[agent], 1)
                    )
                    self.allocator.forget(agent)
                    self.bus.abandon(agent, f"fell silent for {silent_after_s:g} s")
