"""Live allocation: a policy over a Fleet kept in step with the CMS and our own dispatches.

The same accounting moments as the simulator: `started` when a request gets a slot,
`finished` when its reply (or failure) comes back, `enqueued`/`dequeued` around a wait. A
full node's waiting line is first come, first served; a freed slot goes to its head.

What a policy knows of a request's output length is what the simulator's `predicted`
knowledge gives it: a `LengthPredictor` fed with the lengths of finished answers, keyed by
the Classifier Engine's domain and difficulty and the model that wrote them (`max_tokens`
knowledge: the cap alone).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from schemas import AgentCard, CmsEntry, TaskResult
from services.core.cms import CmsView
from services.core.topics import AGENT_CARD, AGENT_STATUS
from services.scheduling.lengths import COMPLETE, EDGE_MODEL, LengthEstimate, LengthPredictor
from services.scheduling.policies import Demand, Fleet, Policy

LiveKnowledge = Literal["predicted", "max_tokens"]


@dataclass(frozen=True, slots=True)
class Grant:
    """Where a request goes: a slot on `agent`, else the cloud for `reason`."""

    agent: str | None
    reason: str = ""  # "cloud": the policy's choice; "full": rejected at the edge
    ticket: int = 0  # the Fleet's ticket of the slot


@dataclass(slots=True)
class _Waiter:
    demand: Demand
    granted: asyncio.Future[int]  # the ticket of its slot; 0: the agent went away


class Allocator:
    """Grants edge slots by policy; workers appear and vanish with their CMS status."""

    def __init__(
        self,
        view: CmsView,
        policy: Policy,
        *,
        rng: random.Random | None = None,
        knowledge: LiveKnowledge = "predicted",
        predictor: LengthPredictor | None = None,
        admits: Callable[[AgentCard], bool] = lambda card: True,
    ) -> None:
        """`admits`: whether an online worker may take tasks (cms/configs/<model>/version)."""
        self.view = view
        self.admits = admits
        self.policy = policy
        self.rng = rng or random.Random()
        self.knowledge = knowledge
        self.predictor = predictor or LengthPredictor()
        self.fleet = Fleet()
        self._lines: dict[str, deque[_Waiter]] = {}
        self._models: dict[str, str] = {}
        view.on_change(self._on_cms_change)

    def demand(
        self,
        *,
        prompt_tokens: int,
        max_tokens: int,
        domain: str | None = None,
        difficulty: str | None = None,
    ) -> Demand:
        """What the policy is told of a request: its length predicted (or only its cap)."""
        return Demand(
            prompt_tokens,
            self._estimate(max_tokens, domain, difficulty, None),
            max_tokens,
            domain,
            difficulty,
        )

    def _estimate(
        self, max_tokens: int, domain: str | None, difficulty: str | None, model: str | None
    ) -> LengthEstimate:
        if self.knowledge == "max_tokens":
            return LengthEstimate.exactly(max_tokens)
        return self.predictor.predict(
            max_tokens=max_tokens, domain=domain, difficulty=difficulty, model=model
        )

    def learn(self, demand: Demand, output_tokens: int, finish_reason: str, model: str) -> None:
        """A whole answer of `output_tokens` came back from `model` (an edge model, the cloud's)."""
        if finish_reason in COMPLETE:
            self.predictor.observe(
                output_tokens, domain=demand.domain, difficulty=demand.difficulty, model=model
            )

    def _start(self, agent: str, demand: Demand) -> int:
        """Count the request in on `agent`, estimated as that agent's model writes."""
        model = self._models.get(agent, EDGE_MODEL)
        estimate = demand.estimate
        if self.knowledge == "predicted":
            estimate = self._estimate(demand.max_tokens, demand.domain, demand.difficulty, model)
        return self.fleet.started(agent, estimate)

    async def acquire(self, demand: Demand) -> Grant:
        """A slot on an edge agent, or why the request goes to the cloud."""
        decision = self.policy.choose(demand, self.fleet, self.rng)
        agent = decision.agent
        if agent is None:
            return Grant(None, "cloud")
        if self.fleet.has_slot(agent):
            return Grant(agent, ticket=self._start(agent, demand))
        if decision.max_wait_s <= 0:
            return Grant(None, f"full: {agent} at its limit")
        return await self._wait(agent, demand, decision.max_wait_s)

    def acquire_free(self, demand: Demand, *, exclude: set[str]) -> Grant:
        """A free slot at once on the fastest agent not in `exclude` (a re-dispatch does not
        wait in a line), or the cloud."""
        free = self.fleet.free * self.fleet.join_rate()
        for i in free.argsort()[::-1]:
            agent = self.fleet.agents[int(i)]
            if free[i] > 0 and agent not in exclude:
                return Grant(agent, ticket=self._start(agent, demand))
        return Grant(None, "full: no other edge agent has a free slot")

    def release(self, grant: Grant, demand: Demand, result: TaskResult | None = None) -> None:
        """The request of `grant` ended (its `result`'s length is learned from, if the answer
        is whole); its slot goes to the head of the line."""
        agent = grant.agent
        if agent is None:
            return
        self.fleet.finished(agent, grant.ticket)
        if result is not None:
            model = self._models.get(agent, EDGE_MODEL)
            self.learn(demand, result.output_tokens, result.finish_reason, model)
        line = self._lines.get(agent)
        while line and agent in self.fleet and self.fleet.spare(agent) > 0:
            waiter = line.popleft()
            if waiter.granted.done():
                continue
            self.fleet.dequeued(agent, waiter.demand.estimate)
            waiter.granted.set_result(self._start(agent, waiter.demand))

    async def _wait(self, agent: str, demand: Demand, max_wait_s: float) -> Grant:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(demand, loop.create_future())
        self._lines.setdefault(agent, deque()).append(waiter)
        self.fleet.enqueued(agent, demand.estimate)
        started = loop.time()
        try:
            async with asyncio.timeout(max_wait_s):
                ticket = await waiter.granted
                if ticket:
                    return Grant(agent, ticket=ticket)
        except TimeoutError:
            waiter.granted.cancel()
            self.fleet.dequeued(agent, demand.estimate)
        return Grant(None, f"full: waited {loop.time() - started:.2f} s for {agent}")

    def forget(self, agent: str) -> None:
        """Take `agent` out of the fleet until its next status (it fell silent)."""
        if agent in self.fleet:
            self.fleet.remove(agent)
        for waiter in self._lines.pop(agent, ()):
            if not waiter.granted.done():
                waiter.granted.set_result(0)

    def refresh(self) -> None:
        """Judge every agent again (what `admits` says changed)."""
        for agent in list(self.view.cards):
            self._update(agent)

    def _on_cms_change(self, key: str, entry: CmsEntry | None) -> None:
        params = AGENT_CARD.match(key) or AGENT_STATUS.match(key)
        if params is not None:
            self._update(params["agent"])

    def _update(self, agent: str) -> None:
        found = self.view.agent(agent)
        card = found.card if found else None
        if (
            found and found.online and card and card.kind == "worker" and card.tokens_per_s
            and self.admits(card)
        ):  # fmt: skip
            self._models[agent] = card.model.name if card.model else EDGE_MODEL
            self.fleet.upsert(
                agent,
                tokens_per_s=card.tokens_per_s,
                concurrency=card.concurrency or 1,
                beta=card.batching_beta if card.batching_beta is not None else 0.5,
            )
        else:
            self.forget(agent)
