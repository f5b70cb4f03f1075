"""One generation step: allocate by policy, dispatch to an edge worker, else the cloud."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from schemas import CmsEntry, Rejected, SamplingOptions, Step, Task, TaskResult
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, PeerGone, RemoteError
from services.core.topics import AGENT_STATUS, TASKS
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


@dataclass(slots=True)
class AgentUsage:
    """What one agent's generations for this orchestrator cost: count, seconds, tokens."""

    tasks: int = 0
    seconds: float = 0.0
    tokens: int = 0
    published: int = 0  # `tasks` when last written to the CMS

    def add(self, seconds: float, tokens: int) -> None:
        self.tasks += 1
        self.seconds += seconds
        self.tokens += tokens

    @property
    def inference_time_avg(self) -> float:
        return self.seconds / self.tasks if self.tasks else 0.0


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
        self.usage: dict[str, AgentUsage] = {}  # per edge agent, for cms/metrics/<agent>/...
        view.on_change(self._on_cms_change)

    async def run(self, job: Job) -> Generated:
        """The policy's agent first; a task it rejects, fails or dies on goes to another
        agent with a free slot (each agent tried once) while the deadline allows, then the
        cloud. Every attempt is a step of the answer's provenance."""
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
        tried: set[str] = set()
        while grant.agent is not None:
            tried.add(grant.agent)
            result: TaskResult | None = None
            try:
                step, result = await self.dispatch(grant.agent, job, attempt=len(tried))
            finally:
                self.allocator.release(grant, demand, result)  # a whole answer's length is learned
            steps.append(step)
            if result is not None:
                return Generated(result.text, Outcome.EDGE, steps)
            if time.time() >= job.deadline:
                return Generated(None, Outcome.FAILED, steps)
            grant = await self._another(demand, tried)
        if not steps:
            steps.append(
                record(job.name, "-", None, None, "rejected", where="none", detail=grant.reason)
            )
        return await self._cloud(job, steps, Outcome.REJECTED_TO_CLOUD, demand)

    async def _another(self, demand: Demand, tried: set[str]) -> Grant:
        """A free slot elsewhere at once, else whatever the policy would wait for, if that is
        not an agent already tried."""
        grant = self.allocator.acquire_free(demand, exclude=tried)
        if grant.agent is not None:
            return grant
        grant = await self.allocator.acquire(demand)
        if grant.agent in tried:
            self.allocator.release(grant, demand)
            return Grant(None, f"full: only {grant.agent}, tried already, has room")
        return grant

    async def dispatch(
        self, agent: str, job: Job, *, attempt: int = 1
    ) -> tuple[Step, TaskResult | None]:
        """Send a task to one worker; a reject, an error, a deadline or a death is a Step too.
        Each attempt has its own task id, so a late result of an abandoned one is ignored."""
        topic = TASKS.format(agent=agent)
        suffix = "" if attempt == 1 else f".{attempt}"
        task = Task(
            task_id=f"{job.request_id}.{job.name}{suffix}",
            request_id=job.request_id,
            prompt=job.prompt,
            max_tokens=job.max_tokens,
            deadline=job.deadline,
            stream=job.stream,
            sampling=job.sampling,
            client=job.client,
        )
        started = time.perf_counter()
        try:
            reply = await self.bus.request(topic, task, deadline=task.deadline, peer=agent)
        except (DeadlineExceeded, RemoteError, PeerGone) as exc:
            return record(job.name, topic, agent, started, "failed", detail=str(exc)), None
        if isinstance(reply, Rejected):
            detail = f"{agent} rejected: {reply.reason} ({reply.active}/{reply.limit})"
            return record(job.name, topic, agent, started, "rejected", detail=detail), None
        assert isinstance(reply, TaskResult)
        self.usage.setdefault(agent, AgentUsage()).add(reply.ms / 1000, reply.output_tokens)
        step = record(
            job.name, topic, agent, started, "ok",
            prompt_tokens=reply.prompt_tokens, output_tokens=reply.output_tokens,
        )  # fmt: skip
        return step, reply

    async def _cloud(
        self, job: Job, steps: list[Step], outcome: Outcome, demand: Demand
    ) -> Generated:
        """The cloud serves what the edge did not; without a cloud the request is refused."""
        if self.cloud is None:
            edge_failed = bool(steps) and steps[-1].outcome == "failed"
            return Generated(None, Outcome.FAILED if edge_failed else Outcome.REJECTED, steps)
        started, topic = time.perf_counter(), f"cloud:{self.cloud.settings.model}"
        try:
            reply = await self.cloud.complete(
                [{"role": "user", "content": job.prompt}],
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
        return Generated(reply.text, outcome, steps)

    def _on_cms_change(self, key: str, entry: CmsEntry | None) -> None:
        if (params := AGENT_STATUS.match(key)) is not None:
            self._heard[params["agent"]] = time.monotonic()
        if (gone := self.view.went_offline(key)) is not None:
            self.bus.abandon(gone)  # its requests in flight fail now, not at deadline

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
