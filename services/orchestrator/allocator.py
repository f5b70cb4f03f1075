"""Live allocation: a policy over a Fleet kept in step with the CMS and our own dispatches.

The same accounting moments as the simulator: `started` when a request gets a slot,
`finished` when its reply (or failure) comes back, `enqueued`/`dequeued` around a wait. A
full node's waiting line is first come, first served; a freed slot goes to its head.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass

from schemas import CmsEntry
from services.core.cms import CmsView
from services.core.topics import AGENT_CARD, AGENT_STATUS
from services.scheduling.policies import Demand, Fleet, Policy


@dataclass(frozen=True, slots=True)
class Grant:
    """Where a request goes: a slot on `agent`, else the cloud for `reason`."""

    agent: str | None
    reason: str = ""  # "cloud": the policy's choice; "full": rejected at the edge


@dataclass(slots=True)
class _Waiter:
    demand: Demand
    granted: asyncio.Future[bool]


class Allocator:
    """Grants edge slots by policy; workers appear and vanish with their CMS status."""

    def __init__(self, view: CmsView, policy: Policy, *, rng: random.Random | None = None) -> None:
        self.view = view
        self.policy = policy
        self.rng = rng or random.Random()
        self.fleet = Fleet()
        self._lines: dict[str, deque[_Waiter]] = {}
        view.on_change(self._on_cms_change)

    async def acquire(self, demand: Demand) -> Grant:
        """A slot on an edge agent, or why the request goes to the cloud."""
        decision = self.policy.choose(demand, self.fleet, self.rng)
        agent = decision.agent
        if agent is None:
            return Grant(None, "cloud")
        if self.fleet.has_slot(agent):
            self.fleet.started(agent, demand.output_tokens)
            return Grant(agent)
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
                self.fleet.started(agent, demand.output_tokens)
                return Grant(agent)
        return Grant(None, "full: no other edge agent has a free slot")

    def release(self, agent: str, demand: Demand) -> None:
        """The request on `agent` ended; its slot goes to the head of the line."""
        self.fleet.finished(agent, demand.output_tokens)
        line = self._lines.get(agent)
        while line and agent in self.fleet and self.fleet.spare(agent) > 0:
            waiter = line.popleft()
            if waiter.granted.done():
                continue
            self.fleet.dequeued(agent, waiter.demand.output_tokens)
            self.fleet.started(agent, waiter.demand.output_tokens)
            waiter.granted.set_result(True)

    async def _wait(self, agent: str, demand: Demand, max_wait_s: float) -> Grant:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(demand, loop.create_future())
        self._lines.setdefault(agent, deque()).append(waiter)
        self.fleet.enqueued(agent, demand.output_tokens)
        started = loop.time()
        try:
            async with asyncio.timeout(max_wait_s):
                if await waiter.granted:
                    return Grant(agent)
        except TimeoutError:
            waiter.granted.cancel()
            self.fleet.dequeued(agent, demand.output_tokens)
        return Grant(None, f"full: waited {loop.time() - started:.2f} s for {agent}")

    def forget(self, agent: str) -> None:
        """Take `agent` out of the fleet until its next status (it fell silent)."""
        if agent in self.fleet:
            self.fleet.remove(agent)
        for waiter in self._lines.pop(agent, ()):
            if not waiter.granted.done():
                waiter.granted.set_result(False)

    def _on_cms_change(self, key: str, entry: CmsEntry | None) -> None:
        params = AGENT_CARD.match(key) or AGENT_STATUS.match(key)
        if params is None:
            return
        agent = params["agent"]
        found = self.view.agent(agent)
        card = found.card if found else None
        if found and found.online and card and card.kind == "worker" and card.tokens_per_s:
            self.fleet.upsert(
                agent,
                tokens_per_s=card.tokens_per_s,
                concurrency=card.concurrency or 1,
                beta=card.batching_beta if card.batching_beta is not None else 0.5,
            )
        else:
            self.forget(agent)
