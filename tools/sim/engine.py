"""Discrete-event simulation of a fleet under a workload, in simulated time.

Node model: with k requests in flight a node decodes `tokens_per_s * k**beta` tokens/s in total,
shared equally (processor sharing). Each node keeps a per-stream "attained service" clock `vs`;
a request that starts at service mark s ends when `vs` reaches s + its output tokens, so a join
or a leave only changes the node's stream rate and its next completion time. Requests told to
wait queue FIFO at their node and start when a slot frees, or go to the cloud when their wait
expires. The cloud has no capacity limit. The policy sees only a `Fleet`, kept up to date with
the same calls the live orchestrator makes.

Several sites (`Sites`): each request arrives at one site, whose policy sees that site's nodes
first. With offload on, a request the site would send to the cloud (its policy says so, or finds
its node full) goes to a free slot at another site if the policy, over the other sites' nodes
(a second `Fleet`, each node with the round trip as extra latency), finds one, as the live
allocator does: it holds that slot from then on and its latency gains the round trip. Every site
sees every node's load exactly (live, a neighbour's load is known from its statuses and its
workers' rejections).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, get_args

from services.scheduling.lengths import CLOUD_MODEL, EDGE_MODEL, LengthEstimate, LengthPredictor
from services.scheduling.outcomes import Outcome, Tally
from services.scheduling.policies import Demand, Fleet, Policy
from tools.sim.workload import Arrival, CloudModel, NodeSpec

_EPS = 1e-9
_EXPIRE, _CLOUD_DONE = -1, -2  # event kinds other than a node's completion

Knowledge = Literal["oracle", "predicted", "max_tokens"]
KNOWLEDGE: tuple[Knowledge, ...] = get_args(Knowledge)


def model_of(spec: NodeSpec) -> str:
    """The model a node serves: its spec's `model` field, else the scenario's one SLM."""
    return str((spec.model_extra or {}).get("model") or EDGE_MODEL)


@dataclass(slots=True)
class _Node:
    """Ground truth of one simulated node."""

    spec: NodeSpec
    k: int = 0
    vs: float = 0.0
    last: float = 0.0
    slot_seconds: float = 0.0
    version: int = 0
    streams: list[tuple[float, int]] = field(default_factory=list)  # heap of (end mark, request)
    waiting: deque[int] = field(default_factory=deque)

    def stream_rate(self) -> float:
        return self.spec.tokens_per_s * self.k ** (self.spec.batching_beta - 1.0)

    def advance(self, now: float) -> None:
        if self.k:
            self.vs += (now - self.last) * self.stream_rate()
            self.slot_seconds += (now - self.last) * self.k
        self.last = now

    def next_end(self) -> float:
        return self.last + (self.streams[0][0] - self.vs) / self.stream_rate()


@dataclass(frozen=True, slots=True)
class Sites:
    """Nodes in several sites: each node's site (an index), the round trip between any two,
    and whether a full site sends work to another's free slot before the cloud."""

    of_node: list[int]
    rtt_s: float
    offload: bool

    @property
    def count(self) -> int:
        return max(self.of_node, default=0) + 1


@dataclass(frozen=True, slots=True)
class SimResult:
    """What one run produced: counts, per-node slot utilization, and each request's end."""

    tally: Tally
    utilization: list[float]
    max_edge_latency_s: float
    end_s: float
    outcomes: list[Outcome]  # per request, in workload order
    latencies_s: list[float | None]
    knowledge: Knowledge = "predicted"
    predicted_tokens: list[float] = field(default_factory=list)  # per request: the mean at arrival
    sites: list[Tally] = field(default_factory=list)  # per site, of the requests arriving there
    offloaded: int = 0  # requests served at another site than their own


class Simulation:
    """One policy over one workload on one fleet; `run()` once."""

    def __init__(
        self,
        requests: list[Arrival],
        nodes: list[NodeSpec],
        policy: Policy,
        *,
        seed: int,
        cloud: CloudModel | None,
        knowledge: Knowledge = "predicted",
        predictor: LengthPredictor | None = None,
        sites: Sites | None = None,
    ) -> None:
        if knowledge not in KNOWLEDGE:
            raise ValueError(f"unknown knowledge {knowledge!r}; valid: {', '.join(KNOWLEDGE)}")
        self.requests, self.policy, self.cloud = requests, policy, cloud
        self.knowledge = knowledge
        self.prices = cloud.prices if cloud else None
        self.now = 0.0
        self.nodes = [_Node(spec) for spec in nodes]
        self.by_id: dict[str, int] = {n.spec.id: i for i, n in enumerate(self.nodes)}
        self.sites = sites or Sites([0] * len(nodes), 0.0, offload=False)
        count = self.sites.count
        # each site's orchestrator: its own predictor (`predictor` is the first's) and random
        self.predictors = [predictor or LengthPredictor()]
        self.predictors += [LengthPredictor() for _ in range(1, count)]
        self.rngs = [random.Random(seed)] + [random.Random(f"{seed}:{s}") for s in range(1, count)]
        self.local = [Fleet(clock=lambda: self.now) for _ in range(count)]
        self.away = [Fleet(clock=lambda: self.now) for _ in range(count)]
        self.views: list[list[Fleet]] = []  # per node: the fleets it is in (its site's first)
        for n, site in zip(nodes, self.sites.of_node, strict=True):
            views = [self.local[site]]
            if self.sites.offload:
                views += [self.away[s] for s in range(count) if s != site]
            for fleet in views:
                fleet.upsert(
                    n.id,
                    tokens_per_s=n.tokens_per_s,
                    concurrency=n.concurrency,
                    beta=n.batching_beta,
                    latency_s=0.0 if fleet is views[0] else self.sites.rtt_s,
                )
            self.views.append(views)
        self.site_tallies = [Tally() for _ in range(count)]
        self.remote: set[int] = set()  # requests served at another site
        self.events: list[tuple[float, int, int, int]] = []  # (time, seq, node or -1, payload)
        self.seq = 0
        self.waiting_at: dict[int, int] = {}  # request -> node it waits at
        self.tally = Tally()
        self.max_edge_latency = 0.0
        self.outcomes: list[Outcome] = [Outcome.FAILED] * len(requests)
        self.latencies: list[float | None] = [None] * len(requests)
        self.estimates: list[LengthEstimate | None] = [None] * len(requests)
        self.tickets: list[list[int]] = [[] for _ in requests]  # per view of its node
        self.predicted: list[float] = [0.0] * len(requests)
        self.models = [model_of(n) for n in nodes]

    def run(self) -> SimResult:
        """Replay every request, then drain; returns the counts."""
        for r, request in enumerate(self.requests):
            self._drain(until=request.t)
            self.now = request.t
            self._arrive(r)
        self._drain(until=float("inf"))
        end = max(self.now, self.requests[-1].t if self.requests else 0.0, _EPS)
        for node in self.nodes:
            node.advance(end)
        util = [n.slot_seconds / (n.spec.concurrency * end) for n in self.nodes]
        return SimResult(
            self.tally,
            util,
            self.max_edge_latency,
            end,
            self.outcomes,
            self.latencies,
            self.knowledge,
            self.predicted,
            self.site_tallies,
            len(self.remote),
        )

    def _push(self, t: float, node: int, payload: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, node, payload))

    def _drain(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            t, _, node, payload = heapq.heappop(self.events)
            self.now = t
            if node == _EXPIRE:
                self._expire(payload)
            elif node == _CLOUD_DONE:
                self._learn(payload, CLOUD_MODEL)
            elif payload == self.nodes[node].version:
                self._complete(node)

    def _estimate(self, req: Arrival, model: str | None = None) -> LengthEstimate:
        """What is known of a request's output length, by the simulation's knowledge."""
        if self.knowledge == "oracle":
            return LengthEstimate.exactly(req.output_tokens, req.max_tokens)
        if self.knowledge == "max_tokens":
            return LengthEstimate.exactly(req.max_tokens)
        return self.predictors[req.site].predict(
            max_tokens=req.max_tokens, domain=req.domain, difficulty=req.difficulty, model=model
        )

    def _learn(self, r: int, model: str) -> None:
        """Request r's answer is complete: its length is known now."""
        if self.knowledge == "predicted":
            req = self.requests[r]
            self.predictors[req.site].observe(
                req.output_tokens, domain=req.domain, difficulty=req.difficulty, model=model
            )

    def _arrive(self, r: int) -> None:
        req = self.requests[r]
        estimate = self.estimates[r] = self._estimate(req)
        self.predicted[r] = estimate.mean
        demand = Demand(req.prompt_tokens, estimate, req.max_tokens, req.domain, req.difficulty)
        rng = self.rngs[req.site]
        decision = self.policy.choose(demand, self.local[req.site], rng)
        outcome = Outcome.CLOUD
        if decision.agent is not None:
            i = self.by_id[decision.agent]
            node = self.nodes[i]
            if self._has_slot(i):
                self._start(i, r)
                return
            if decision.max_wait_s > 0:
                node.waiting.append(r)
                self.waiting_at[r] = i
                for fleet in self.views[i]:
                    fleet.enqueued(node.spec.id, estimate)
                self._push(self.now + decision.max_wait_s, _EXPIRE, r)
                return
            outcome = Outcome.REJECTED_TO_CLOUD
        if self.sites.offload:
            away = self.policy.choose(demand, self.away[req.site], rng).agent
            if away is not None and self._has_slot(self.by_id[away]):
                self.remote.add(r)
                self._start(self.by_id[away], r)
                return
        self._to_cloud(r, outcome)

    def _has_slot(self, i: int) -> bool:
        node = self.nodes[i]
        return node.k < node.spec.concurrency and not node.waiting

    def _start(self, i: int, r: int) -> None:
        node = self.nodes[i]
        node.advance(self.now)
        heapq.heappush(node.streams, (node.vs + self.requests[r].output_tokens, r))
        node.k += 1
        estimate = self.estimates[r]
        if self.knowledge == "predicted":  # on this node: what this node's model writes
            estimate = self._estimate(self.requests[r], self.models[i])
        assert estimate is not None
        self.tickets[r] = [fleet.started(node.spec.id, estimate) for fleet in self.views[i]]
        self._reschedule(i)

    def _reschedule(self, i: int) -> None:
        node = self.nodes[i]
        node.version += 1
        if node.k:
            self._push(node.next_end(), i, node.version)

    def _complete(self, i: int) -> None:
        node = self.nodes[i]
        node.advance(self.now)
        while node.streams and node.streams[0][0] <= node.vs + _EPS * max(1.0, node.vs):
            _, r = heapq.heappop(node.streams)
            node.k -= 1
            for fleet, ticket in zip(self.views[i], self.tickets[r], strict=True):
                fleet.finished(node.spec.id, ticket)
            self._learn(r, self.models[i])
            latency = self.now - self.requests[r].t + (self.sites.rtt_s if r in self.remote else 0)
            self.max_edge_latency = max(self.max_edge_latency, latency)
            self._record(r, Outcome.EDGE, latency)
        if not node.k:
            node.vs = 0.0
        while node.waiting and node.k < node.spec.concurrency:
            r = node.waiting.popleft()
            del self.waiting_at[r]
            self._dequeued(i, r)
            self._start(i, r)
        self._reschedule(i)

    def _expire(self, r: int) -> None:
        i = self.waiting_at.pop(r, None)
        if i is None:
            return  # it got a slot in time
        self.nodes[i].waiting.remove(r)
        self._dequeued(i, r)
        self._to_cloud(r, Outcome.REJECTED_TO_CLOUD)

    def _dequeued(self, i: int, r: int) -> None:
        for fleet in self.views[i]:
            fleet.dequeued(self.nodes[i].spec.id, self.estimates[r] or 0)

    def _to_cloud(self, r: int, outcome: Outcome) -> None:
        req = self.requests[r]
        if self.cloud is None or self.prices is None:
            self._record(r, Outcome.REJECTED, None)
            return
        waited = self.now - req.t
        cost = self.prices.cost(req.prompt_tokens, req.output_tokens)
        latency = self.cloud.latency_s(req.output_tokens)
        if self.knowledge == "predicted":
            self._push(self.now + latency, _CLOUD_DONE, r)
        self._record(r, outcome, waited + latency, cost)

    def _record(self, r: int, outcome: Outcome, latency: float | None, cost: float = 0.0) -> None:
        self.outcomes[r], self.latencies[r] = outcome, latency
        self.tally.record(outcome, latency_s=latency, cost_usd=cost)
        self.site_tallies[self.requests[r].site].record(outcome, latency_s=latency, cost_usd=cost)


def simulate(
    requests: list[Arrival],
    nodes: list[NodeSpec],
    policy: Policy,
    *,
    seed: int = 0,
    cloud: CloudModel | None = None,
    knowledge: Knowledge = "predicted",
    predictor: LengthPredictor | None = None,
    sites: Sites | None = None,
) -> SimResult:
    """Run `policy` over `requests` on `nodes`; `cloud` None means no cloud (rejections stay).

    `knowledge` is what the policy may know of output lengths (see the module); a fresh
    predictor learns from nothing unless one is given. `sites`: the nodes' sites (a request's
    is its `site`); None: one site."""
    sim = Simulation(
        requests,
        nodes,
        policy,
        seed=seed,
        cloud=cloud,
        knowledge=knowledge,
        predictor=predictor,
        sites=sites,
    )
    return sim.run()
