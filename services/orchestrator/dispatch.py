"""One generation step: allocate by policy, dispatch to an edge worker, else the cloud."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from schemas import CmsEntry, Rejected, SamplingOptions, Step, Task, TaskResult
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, PeerGone, RemoteError
from services.core.topics import AGENT_STATUS, TASKS
from services.orchestrator.allocator import Allocator
from services.orchestrator.cloud import CloudClient, CloudError
from services.orchestrator.provenance import record
from services.scheduling.outcomes import Outcome
from services.scheduling.policies import Demand


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
    client: str | None = None  # the requester, whose streams these tokens are


@dataclass(slots=True)
class Generated:
    """A generation's text (None when nobody served it), how it ended, and its steps."""

    text: str | None
    outcome: Outcome
    steps: list[Step] = field(default_factory=list)


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
        view.on_change(self._on_cms_change)

    async def run(self, job: Job) -> Generated:
        demand = Demand(prompt_tokens=estimate_tokens(job.prompt), output_tokens=job.max_tokens)
        grant = await self.allocator.acquire(demand)
        if grant.agent is None:
            if grant.reason == "cloud":
                return await self._cloud(job, [], Outcome.CLOUD)
            refused = record(
                job.name, "-", None, None, "rejected", where="none", detail=grant.reason
            )
            return await self._cloud(job, [refused], Outcome.REJECTED_TO_CLOUD)
        try:
            step, result = await self.dispatch(grant.agent, job)
        finally:
            self.allocator.release(grant.agent, demand)
        if result is not None:
            return Generated(result.text, Outcome.EDGE, [step])
        return await self._cloud(job, [step], Outcome.REJECTED_TO_CLOUD)

    async def dispatch(self, agent: str, job: Job) -> tuple[Step, TaskResult | None]:
        """Send a task to one worker; a reject, an error, a deadline or a death is a Step too."""
        topic = TASKS.format(agent=agent)
        task = Task(
            task_id=f"{job.request_id}.{job.name}",
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
        tokens = {"prompt_tokens": reply.prompt_tokens, "output_tokens": reply.output_tokens}
        return record(job.name, topic, agent, started, "ok", **tokens), reply

    async def _cloud(self, job: Job, steps: list[Step], outcome: Outcome) -> Generated:
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
        usage = {"prompt_tokens": reply.prompt_tokens, "output_tokens": reply.output_tokens}
        cost = reply.cost_usd
        steps.append(
            record(job.name, topic, None, started, "ok", where="cloud", cost_usd=cost, **usage)
        )
        return Generated(reply.text, outcome, steps)

    def _on_cms_change(self, key: str, entry: CmsEntry | None) -> None:
        params = AGENT_STATUS.match(key)
        if params is None:
            return
        view = self.view.agent(params["agent"])
        if view is None or not view.online:
            self.bus.abandon(params["agent"])  # its requests in flight fail now, not at deadline
