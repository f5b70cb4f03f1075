"""Live allocation: a policy over a Fleet kept in step with the CMS and our own dispatches.

Two fleets: this site's workers (`cms/agents/...`) and the neighbour sites' (`cms/sites/<site>/
agents/...`, as the replicator mirrors them, named `<site>/<agent>`), each with its site's
round trip as extra latency (`cms/replication/peers/<site>`: only sites whose link is up). The
policy chooses over this site's first; a request that no local agent can take within its
deadline (the policy sends it to the cloud, or finds its agent full) takes a free slot at a
neighbour site if the policy, over the neighbours' fleet, finds one; then the cloud. It never
waits in a line at a neighbour site: that site's own requests come first there.

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

from pydantic import BaseModel, Field

from schemas import AgentCard, CmsEntry, TaskResult
from services.core.cms import AgentView, CmsView
from services.core.topics import (
    AGENT_CARD,
    AGENT_STATUS,
    REMOTE_AGENT_CARD,
    REMOTE_AGENT_STATUS,
    REPLICATION_PEER,
)
from services.scheduling.lengths import COMPLETE, EDGE_MODEL, LengthEstimate, LengthPredictor
from services.scheduling.policies import Demand, Fleet, Policy

LiveKnowledge = Literal["predicted", "max_tokens"]


@dataclass(frozen=True, slots=True)
class Grant:
    """Where a request goes: a slot on `agent`, else the cloud for `reason`."""

    agent: str | None
    reason: str = ""  # "cloud": the policy's choice; "full": rejected at the edge
    ticket: int = 0  # the Fleet's ticket of the slot
    site: str | None = None  # the neighbour site of `agent`; None: this site

    @property
    def key(self) -> str | None:
        """The agent as the fleets name it (a neighbour's: `<site>/<agent>`)."""
        return self.agent if self.site is None else f"{self.site}/{self.agent}"


class _Link(BaseModel):
    """What the allocator reads of `cms/replication/peers/<site>`."""

    connected: bool
    rtt_ms: float | None = Field(None, ge=0, allow_inf_nan=False)


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
        self.neighbours = Fleet()  # the neighbour sites' workers, `<site>/<agent>`
        self._rtt_s: dict[str, float] = {}  # neighbour sites whose link is up
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

    def _grant(self, fleet: Fleet, key: str, demand: Demand) -> Grant:
        """Count the request in on `key` of `fleet`, estimated as that agent's model writes."""
        model = self._models.get(key, EDGE_MODEL)
        estimate = demand.estimate
        if self.knowledge == "predicted":
            estimate = self._estimate(demand.max_tokens, demand.domain, demand.difficulty, model)
        site, _, agent = key.rpartition("/")
        return Grant(agent, ticket=fleet.started(key, estimate), site=site or None)

    async def acquire(self, demand: Demand) -> Grant:
        """A slot on an edge agent (this site's first, then a neighbour's), or why the
        request goes to the cloud."""
        decision = self.policy.choose(demand, self.fleet, self.rng)
        agent = decision.agent
        if agent is not None and self.fleet.has_slot(agent):
            return self._grant(self.fleet, agent, demand)
        if agent is not None and decision.max_wait_s > 0:
            return await self._wait(agent, demand, decision.max_wait_s)
        away = self.policy.choose(demand, self.neighbours, self.rng).agent
        if away is not None and self.neighbours.has_slot(away):
            return self._grant(self.neighbours, away, demand)
        return Grant(None, "cloud") if agent is None else Grant(None, f"full: {agent} at its limit")

    def acquire_free(self, demand: Demand, *, exclude: set[str | None]) -> Grant:
        """A free slot at once on the fastest agent not in `exclude` (a re-dispatch does not
        wait in a line), this site's first, or the cloud."""
        for fleet in (self.fleet, self.neighbours):
            free = fleet.free * fleet.join_rate()
            for i in free.argsort()[::-1]:
                key = fleet.agents[int(i)]
                if free[i] > 0 and key not in exclude:
                    return self._grant(fleet, key, demand)
        return Grant(None, "full: no other edge agent has a free slot")

    def release(self, grant: Grant, demand: Demand, result: TaskResult | None = None) -> None:
        """The request of `grant` ended (its `result`'s length is learned from, if the answer
        is whole); its slot goes to the head of the line."""
        agent = grant.key
        if agent is None:
            return
        (self.fleet if grant.site is None else self.neighbours).finished(agent, grant.ticket)
        if result is not None:
            model = self._models.get(agent, EDGE_MODEL)
            self.learn(demand, result.output_tokens, result.finish_reason, model)
        line = self._lines.get(agent)
        while line and agent in self.fleet and self.fleet.spare(agent) > 0:
            waiter = line.popleft()
            if waiter.granted.done():
                continue
            self.fleet.dequeued(agent, waiter.demand.estimate)
            waiter.granted.set_result(self._grant(self.fleet, agent, waiter.demand).ticket)

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
        """Take `agent` (a neighbour's: `<site>/<agent>`) out of the fleets until its next
        status (it fell silent, went offline, or its site's link is down)."""
        self.fleet.remove(agent)
        self.neighbours.remove(agent)
        for waiter in self._lines.pop(agent, ()):
            if not waiter.granted.done():
                waiter.granted.set_result(0)

    def refresh(self) -> None:
        """Judge every agent again (what `admits` says changed)."""
        for agent in list(self.view.cards):
            self._update(self.fleet, agent, self.view.agent(agent))

    def _on_cms_change(self, key: str, entry: CmsEntry | None) -> None:
        if (params := AGENT_CARD.match(key) or AGENT_STATUS.match(key)) is not None:
            agent = params["agent"]
            self._update(self.fleet, agent, self.view.agent(agent))
        elif (params := REMOTE_AGENT_CARD.match(key) or REMOTE_AGENT_STATUS.match(key)) is not None:
            self._update_remote(params["site"], params["agent"])
        elif (params := REPLICATION_PEER.match(key)) is not None:
            site = params["site"]
            link = self.view.value(key, _Link)
            if link is not None and link.connected and link.rtt_ms is not None:
                self._rtt_s[site] = link.rtt_ms / 1000
            else:
                self._rtt_s.pop(site, None)
            for card_key, _ in self.view.items(f"sites/{site}/agents/"):
                if (card := REMOTE_AGENT_CARD.match(card_key)) is not None:
                    self._update_remote(site, card["agent"])

    def _update_remote(self, site: str, agent: str) -> None:
        rtt = self._rtt_s.get(site)
        found = self.view.remote_agent(site, agent) if rtt is not None else None
        self._update(self.neighbours, f"{site}/{agent}", found, latency_s=rtt or 0.0)

    def _update(
        self, fleet: Fleet, key: str, found: AgentView | None, *, latency_s: float = 0.0
    ) -> None:
        """An online worker joins `fleet` (or changes its capacity); anything else leaves."""
        card = found.card if found else None
        if (
            found and found.online and card and card.kind == "worker" and card.tokens_per_s
            and self.admits(card)
        ):  # fmt: skip
            self._models[key] = card.model.name if card.model else EDGE_MODEL
            fleet.upsert(
                key,
                tokens_per_s=card.tokens_per_s,
                concurrency=card.concurrency or 1,
                beta=card.batching_beta if card.batching_beta is not None else 0.5,
                latency_s=latency_s,
            )
        else:
            self.forget(key)
