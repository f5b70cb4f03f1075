"""The Task Orchestrator: answers each Query on the edge when it can, else in the cloud."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque

import structlog

from schemas import Answer, CmsEntry, Query, Rejected, Step, Task, TaskResult
from services.core import cms
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, RemoteError
from services.core.topics import AGENT_STATUS, METRIC, QUERIES, TASKS
from services.orchestrator.allocator import Allocator
from services.orchestrator.cloud import CloudClient, CloudError, CloudReply
from services.orchestrator.outcomes import Outcome, Tally
from services.orchestrator.policies import Demand

log = structlog.get_logger("edgecollab.orchestrator")

LATENCY_WINDOW = 10_000  # latencies kept for the metrics' percentiles


class AgentGone(Exception):
    """The agent a request was sent to went offline before answering."""


def estimate_tokens(text: str) -> int:
    """Prompt tokens before any tokenizer sees the text (~4 characters a token)."""
    return max(1, round(len(text) / 4))


class Orchestrator:
    """Allocates each query by policy, dispatches it, falls back to the cloud, counts outcomes."""

    def __init__(
        self,
        *,
        bus: Bus,
        view: CmsView,
        allocator: Allocator,
        cloud: CloudClient | None = None,
    ) -> None:
        self.bus = bus
        self.view = view
        self.allocator = allocator
        self.cloud = cloud
        self.tally = Tally(latencies_s=deque(maxlen=LATENCY_WINDOW))  # type: ignore[arg-type]
        self._gone: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        view.on_change(self._on_cms_change)
        bus.serve(QUERIES, self.handle_query, shared="orchestrators")

    async def handle_query(self, request: Request[Query]) -> Answer:
        query = request.body
        started = time.perf_counter()
        demand = Demand(prompt_tokens=estimate_tokens(query.text), output_tokens=query.max_tokens)
        grant = await self.allocator.acquire(demand)
        if grant.agent is None:
            outcome = Outcome.CLOUD if grant.reason == "cloud" else Outcome.REJECTED_TO_CLOUD
            steps = [] if grant.reason == "cloud" else [_allocation_step(grant.reason)]
            return await self._cloud(query, started, steps, outcome)
        try:
            step, result = await self.dispatch(grant.agent, _task(query))
        finally:
            self.allocator.release(grant.agent, demand)
        if result is not None:
            return self._answer(query, started, result.text, Outcome.EDGE, [step])
        return await self._cloud(query, started, [step], Outcome.REJECTED_TO_CLOUD)

    async def dispatch(self, agent: str, task: Task) -> tuple[Step, TaskResult | None]:
        """Send a task to one worker; a reject, an error, a deadline or a death is a Step too."""
        topic = TASKS.format(agent=agent)
        started = time.perf_counter()
        try:
            reply = await self._request_while_alive(agent, topic, task)
        except (DeadlineExceeded, RemoteError, AgentGone) as exc:
            return _step(topic, agent, started, "failed", detail=str(exc)), None
        if isinstance(reply, Rejected):
            detail = f"{agent} rejected: {reply.reason} ({reply.active}/{reply.limit})"
            return _step(topic, agent, started, "rejected", detail=detail), None
        assert isinstance(reply, TaskResult)
        return _step(topic, agent, started, "ok", result=reply), reply

    async def _cloud(
        self, query: Query, started: float, steps: list[Step], outcome: Outcome
    ) -> Answer:
        """The cloud serves what the edge did not; without a cloud the request is rejected."""
        edge_failed = bool(steps) and steps[-1].outcome == "failed"
        if self.cloud is None:
            final = Outcome.FAILED if edge_failed else Outcome.REJECTED
            reason = steps[-1].detail if steps else "the policy sent it to the cloud"
            text = f"{final.value}: {reason}; no cloud endpoint is configured"
            return self._answer(query, started, text, final, steps)
        step_started = time.perf_counter()
        try:
            reply = await self.cloud.complete(
                [{"role": "user", "content": query.text}],
                max_tokens=query.max_tokens,
                temperature=query.sampling.temperature,
                request_id=query.request_id,
            )
        except CloudError as exc:
            steps.append(_cloud_step(self.cloud, step_started, "failed", detail=str(exc)))
            return self._answer(query, started, f"failed: {exc}", Outcome.FAILED, steps)
        steps.append(_cloud_step(self.cloud, step_started, "ok", reply=reply))
        return self._answer(query, started, reply.text, outcome, steps)

    def _answer(
        self, query: Query, started: float, text: str, outcome: Outcome, steps: list[Step]
    ) -> Answer:
        seconds = time.perf_counter() - started
        cost = sum(s.cost_usd for s in steps)
        answered = outcome not in (Outcome.REJECTED, Outcome.FAILED)
        self.tally.record(outcome, latency_s=seconds if answered else None, cost_usd=cost)
        return Answer(
            request_id=query.request_id,
            text=text,
            outcome=outcome.value,
            steps=steps,
            ms=round(seconds * 1000, 3),
            cost_usd=round(cost, 8),
        )

    async def publish_metrics(self, *, interval_s: float = 5.0) -> None:
        """cms/metrics/<orchestrator>/requests: outcome counts, cloud spend, latency."""
        key = METRIC.format(scope=self.bus.client_id, name="requests")
        version, last = 0, -1
        while True:
            await asyncio.sleep(interval_s)
            if self.tally.requests != last and self.bus.connected.is_set():
                version, last = version + 1, self.tally.requests
                summary = self.tally.summary() | {"policy": self.allocator.policy.name}
                await cms.put(self.bus, key, summary, version=version)

    async def _request_while_alive(self, agent: str, topic: str, task: Task) -> object:
        gone = self._gone[agent]
        request = asyncio.ensure_future(
            self.bus.request(topic, task, replies=TASKS.replies, deadline=task.deadline)
        )
        watch = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({request, watch}, return_when=asyncio.FIRST_COMPLETED)
            if request.done():
                return request.result()
            raise AgentGone(f"{agent} went offline before answering")
        finally:
            request.cancel()
            watch.cancel()

    def _on_cms_change(self, key: str, entry: CmsEntry | None) -> None:
        params = AGENT_STATUS.match(key)
        if params is None:
            return
        view = self.view.agent(params["agent"])
        if (view is None or not view.online) and params["agent"] in self._gone:
            self._gone.pop(params["agent"]).set()  # wakes the requests in flight there


def _task(query: Query) -> Task:
    return Task(
        task_id=f"{query.request_id}.gen",
        request_id=query.request_id,
        prompt=query.text,
        max_tokens=query.max_tokens,
        deadline=query.deadline,
        stream=query.stream,
        sampling=query.sampling,
    )


def _step(
    topic: str,
    agent: str,
    started: float,
    outcome: str,
    *,
    result: TaskResult | None = None,
    detail: str | None = None,
) -> Step:
    return Step(
        name="generate",
        topic=topic,
        agent=agent,
        where="edge",
        outcome=outcome,  # type: ignore[arg-type]
        prompt_tokens=result.prompt_tokens if result else 0,
        output_tokens=result.output_tokens if result else 0,
        ms=round((time.perf_counter() - started) * 1000, 3),
        detail=detail,
    )


def _allocation_step(reason: str) -> Step:
    return Step(
        name="allocate", topic="-", agent=None, where="none", outcome="rejected", detail=reason
    )


def _cloud_step(
    cloud: CloudClient, started: float, outcome: str, *, reply=None, detail=None
) -> Step:  # type: ignore[no-untyped-def]
    return Step(
        name="generate",
        topic=f"cloud:{cloud.settings.model}",
        agent=None,
        where="cloud",
        outcome=outcome,  # type: ignore[arg-type]
        prompt_tokens=reply.prompt_tokens if reply else 0,
        output_tokens=reply.output_tokens if reply else 0,
        ms=round((time.perf_counter() - started) * 1000, 3),
        cost_usd=round(reply.cost_usd, 8) if reply else 0.0,
        detail=detail,
    )
