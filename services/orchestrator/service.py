"""The Task Orchestrator: answers each Query by dispatching work to edge agents."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict

import structlog

from schemas import Answer, CmsEntry, Query, Rejected, Step, Task, TaskResult
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, RemoteError
from services.core.topics import AGENT_STATUS, QUERIES, TASKS

log = structlog.get_logger("edgecollab.orchestrator")


class AgentGone(Exception):
    """The agent a request was sent to went offline before answering."""


class Orchestrator:
    """Plans, allocates and dispatches queries over the CMS view."""

    def __init__(self, *, bus: Bus, view: CmsView, rng: random.Random | None = None) -> None:
        self.bus = bus
        self.view = view
        self.rng = rng or random.Random()
        self._gone: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        view.on_change(self._on_cms_change)
        bus.serve(QUERIES, self.handle_query, shared="orchestrators")

    async def handle_query(self, request: Request[Query]) -> Answer:
        query = request.body
        started = time.perf_counter()
        agent = self.choose_worker()
        if agent is None:
            return _answer(query, started, "no edge worker is online", "rejected", [])
        task = Task(
            task_id=f"{query.request_id}.gen",
            request_id=query.request_id,
            prompt=query.text,
            max_tokens=query.max_tokens,
            deadline=query.deadline,
            stream=query.stream,
            sampling=query.sampling,
        )
        step, result = await self.dispatch(agent, task)
        if isinstance(result, TaskResult):
            return _answer(query, started, result.text, "edge", [step])
        outcome = "rejected" if step.outcome == "rejected" else "failed"
        return _answer(query, started, step.detail or "", outcome, [step])

    def choose_worker(self) -> str | None:
        """Uniformly among online workers."""
        online = [a.card.agent for a in self.view.agents("worker") if a.online]
        return self.rng.choice(online) if online else None

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
        step = _step(topic, agent, started, "ok", result=reply)
        return step, reply

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


def _answer(query: Query, started: float, text: str, outcome: str, steps: list[Step]) -> Answer:
    return Answer(
        request_id=query.request_id,
        text=text,
        outcome=outcome,  # type: ignore[arg-type]
        steps=steps,
        ms=round((time.perf_counter() - started) * 1000, 3),
        cost_usd=sum(s.cost_usd for s in steps),
    )
