"""Allocation policies: pure decisions over a `Fleet`, shared by the live orchestrator and the
simulator.

A policy returns a `Decision`: an agent (the request starts there if it has a free slot; if the
agent is full the request may wait there up to `max_wait_s`, else it is rejected and goes to the
cloud) or no agent (straight to the cloud). The node model behind the estimates is the one the
simulator runs: with k requests in flight a node decodes `tokens_per_s * k**beta` tokens/s in
total, shared equally.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from services.scheduling.lengths import LengthEstimate

Tokens = LengthEstimate | float  # a length estimate, or a number of tokens known exactly


def as_estimate(tokens: Tokens) -> LengthEstimate:
    """A length estimate; a plain number is a point estimate."""
    return tokens if isinstance(tokens, LengthEstimate) else LengthEstimate.exactly(tokens)


@dataclass(frozen=True, slots=True)
class Demand:
    """What a policy knows of a request when it arrives: never its true output length.

    `estimate` is the predicted output length with its uncertainty (`LengthEstimate`); the
    simulator's clairvoyant mode alone makes it the true length, for comparison.
    """

    prompt_tokens: int
    estimate: LengthEstimate
    max_tokens: int = 512
    domain: str | None = None
    difficulty: str | None = None

    @classmethod
    def of(cls, prompt_tokens: int, tokens: Tokens, **known: object) -> Demand:
        """A demand whose output length is `tokens` (a number: known exactly)."""
        estimate = as_estimate(tokens)
        known.setdefault("max_tokens", max(math.ceil(estimate.cap), 1))
        return cls(prompt_tokens, estimate, **known)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes: agent None is the cloud; a full agent may be waited on max_wait_s."""

    agent: str | None
    max_wait_s: float = 0.0


CLOUD = Decision(None)


@dataclass(slots=True)
class _Stream:
    """One request in flight: where it started on its node's service clock, what is expected."""

    start: float  # the node's vs when it started
    estimate: LengthEstimate
    end: float  # expected end mark: start + expected length given the progress so far
    check: float  # vs mark at which `end` must be re-estimated (inf: never)


@dataclass(slots=True)
class _Node:
    """One node's state in plain floats; `Fleet` mirrors what decisions read into arrays."""

    rate: float
    limit: int
    beta: float
    latency: float = 0.0  # seconds any request there pays on top (a neighbour site's round trip)
    queued: int = 0
    queued_tokens: float = 0.0  # expected output tokens of the waiting requests
    vs: float = 0.0  # service each stream has had since the node was last idle (tokens)
    last: float = 0.0  # when vs was brought up to date
    streams: dict[int, _Stream] = field(default_factory=dict)
    ends: list[tuple[float, int]] = field(default_factory=list)  # sorted (end mark, ticket)
    check: float = math.inf  # the earliest stream check mark
    uncertain: int = 0  # streams whose estimate is a distribution, not a point
    version: int = 0  # bumped whenever the streams or their estimates change
    _order: tuple[int, int, float] = (-1, -1, 0.0)  # (version, j, the j-th end) cached

    @property
    def active(self) -> int:
        return len(self.streams)

    def stream_rate(self, k: int) -> float:
        return self.rate * max(k, 1) ** (self.beta - 1.0)

    def advance(self, now: float) -> None:
        if self.streams:
            self.vs += (now - self.last) * self.stream_rate(len(self.streams))
        self.last = now

    def add(self, ticket: int, estimate: LengthEstimate) -> None:
        end, check = estimate.expected_total(0.0)
        self.streams[ticket] = _Stream(self.vs, estimate, self.vs + end, self.vs + check)
        bisect.insort(self.ends, (self.vs + end, ticket))
        self.check = min(self.check, self.vs + check)
        self.uncertain += not estimate.exact
        self.version += 1

    def drop(self, ticket: int) -> bool:
        stream = self.streams.pop(ticket, None)
        if stream is None:
            return False
        del self.ends[bisect.bisect_left(self.ends, (stream.end, ticket))]
        self.uncertain -= not stream.estimate.exact
        self.version += 1
        if stream.check <= self.check:
            self.check = min((s.check for s in self.streams.values()), default=math.inf)
        if not self.streams:
            self.vs = 0.0  # an idle node forgets the estimate's drift
        return True

    def reestimate(self) -> None:
        """Streams whose progress passed their check mark get a new expected end."""
        for ticket, s in self.streams.items():
            if s.check <= self.vs:
                del self.ends[bisect.bisect_left(self.ends, (s.end, ticket))]
                end, check = s.estimate.expected_total(self.vs - s.start)
                s.end, s.check = s.start + end, s.start + check
                bisect.insort(self.ends, (s.end, ticket))
        self.check = min((s.check for s in self.streams.values()), default=math.inf)
        self.version += 1

    def order_end(self, j: int) -> float:
        """The expected (j+1)-th earliest end mark of the streams in flight.

        With point estimates, the (j+1)-th smallest mark. Otherwise the expectation of that
        order statistic of independent lengths, each given its progress: with F_i the
        probability that stream i has ended by mark g, the count ended by g is Poisson-binomial
        over the streams. Between changes all streams progress alike, so the value (a mark on
        the node's service clock) holds until a stream starts, ends or passes a support point.
        """
        if not self.uncertain:
            return self.ends[j][0]
        if self._order[:2] == (self.version, j):
            return self._order[2]
        parts = []
        for s in self.streams.values():
            support, cdf = s.estimate.given_cdf(self.vs - s.start)
            parts.append((s.start + support, cdf))
        grid = np.unique(np.concatenate([marks for marks, _ in parts]))
        counts = np.zeros((len(parts) + 1, grid.size))
        counts[0] = 1.0  # counts[n, g]: probability that n streams have ended by grid[g]
        for n, (marks, cdf) in enumerate(parts, start=1):
            ended = np.concatenate([[0.0], cdf])[np.searchsorted(marks, grid, side="right")]
            counts[1 : n + 1] = counts[1 : n + 1] * (1.0 - ended) + counts[:n] * ended
            counts[0] *= 1.0 - ended
        by = counts[j + 1 :].sum(axis=0)  # P(the (j+1)-th end is at or before grid[g])
        value = float(np.dot(grid, np.diff(by, prepend=0.0)) / max(by[-1], 1e-12))
        self._order = (self.version, j, value)
        return value

    def row(self) -> tuple[float, ...]:
        """The values of `_COLUMNS`, in order."""
        k, q = self.active, self.queued
        stream = self.stream_rate(k)
        j = min(q, max(k - 1, 0))  # a newcomer starts when the (j+1)-th earliest stream ends
        next_mark = math.inf
        if k:  # NaN: the expected order statistic, computed when a decision needs it
            known = not self.uncertain or self._order[:2] == (self.version, j)
            next_mark = self.order_end(j) if known else math.nan
        return (
            self.rate, self.limit, k, q, (k + q) / self.limit,
            float(k < self.limit and not q), self.stream_rate(k + 1),
            self.rate * self.limit ** (self.beta - 1.0), stream, self.vs, self.last,
            next_mark, q - j, 1.0 / (stream * max(k, 1)), self.queued_tokens / q if q else 0.0,
            self.check, self.latency,
        )  # fmt: skip


_COLUMNS = (
    "rate", "limit", "active", "queued", "util", "free", "join", "full", "stream", "vs", "last",
    "next_mark", "extra_waiters", "agg_inv", "queued_mean", "check", "latency",
)  # fmt: skip
_COL = {name: c for c, name in enumerate(_COLUMNS)}


class Fleet:
    """The allocation view of the nodes: capacity and in-flight work, mirrored in numpy arrays.

    In-flight work is tracked as the node model predicts it: each node's streams progress at
    `tokens_per_s * k**(beta-1)`, so the orchestrator's own `started`/`finished` calls are enough
    to estimate when each request will end (its mark on the node's per-stream service clock),
    without any message from the worker. Updates cost O(limit); decisions read whole columns.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._nodes: list[_Node] = []
        self._table = np.zeros((len(_COLUMNS), 8))
        self._cum_rate: list[float] | None = None
        self._tickets = itertools.count(1)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, agent: object) -> bool:
        return agent in self._index

    @property
    def agents(self) -> list[str]:
        """Agent ids, in the order of the arrays."""
        return self._ids

    def now(self) -> float:
        return self._clock()

    def column(self, name: str) -> np.ndarray:
        """One column of the table (a view; do not write), one entry per agent."""
        return self._table[_COL[name], : len(self._ids)]

    rate = property(lambda self: self.column("rate"), doc="decode tok/s of one request alone")
    limit = property(lambda self: self.column("limit"), doc="concurrency limit")
    active = property(lambda self: self.column("active"), doc="requests in flight")
    queued = property(lambda self: self.column("queued"), doc="requests waiting for a slot")
    free = property(lambda self: self.column("free"), doc="1.0 where a request can start now")
    latency = property(lambda self: self.column("latency"), doc="extra seconds per request")

    def _sync(self, i: int) -> None:
        self._table[:, i] = self._nodes[i].row()

    def upsert(
        self,
        agent: str,
        *,
        tokens_per_s: float,
        concurrency: int,
        beta: float = 0.5,
        latency_s: float = 0.0,
    ) -> None:
        """Add a node or update its capacity and extra latency (a neighbour site's round
        trip); its in-flight accounting is kept."""
        if tokens_per_s <= 0 or concurrency < 1 or not 0 <= latency_s < math.inf:
            raise ValueError(
                f"{agent}: tokens_per_s must be > 0, concurrency >= 1, latency_s finite >= 0"
            )
        i = self._index.get(agent)
        if i is None:
            i = self._append(agent, _Node(tokens_per_s, concurrency, beta, last=self.now()))
        node = self._nodes[i]
        node.advance(self.now())
        node.rate, node.limit, node.beta, node.latency = tokens_per_s, concurrency, beta, latency_s
        self._sync(i)
        self._cum_rate = None

    def _append(self, agent: str, node: _Node) -> int:
        i = len(self._ids)
        if i == self._table.shape[1]:
            self._table = np.hstack([self._table, np.zeros_like(self._table)])
        self._ids.append(agent)
        self._index[agent] = i
        self._nodes.append(node)
        return i

    def remove(self, agent: str) -> None:
        """Forget a node (gone offline); unknown agents are ignored."""
        i = self._index.pop(agent, None)
        if i is None:
            return
        last = len(self._ids) - 1
        if i != last:
            self._ids[i], self._nodes[i] = self._ids[last], self._nodes[last]
            self._index[self._ids[i]] = i
            self._table[:, i] = self._table[:, last]
        self._ids.pop()
        self._nodes.pop()
        self._cum_rate = None

    def started(self, agent: str, tokens: Tokens) -> int:
        """A request began on `agent`, of `tokens` expected output (an estimate or a number);
        returns the ticket that `finished` takes."""
        i = self._index[agent]
        node = self._nodes[i]
        node.advance(self.now())
        ticket = next(self._tickets)
        node.add(ticket, as_estimate(tokens))
        self._sync(i)
        return ticket

    def finished(self, agent: str, ticket: int) -> None:
        """The request of `ticket` on `agent` ended (done, failed or cancelled)."""
        i = self._index.get(agent)
        if i is None:
            return
        node = self._nodes[i]
        node.advance(self.now())
        if node.drop(ticket):
            self._sync(i)

    def enqueued(self, agent: str, tokens: Tokens) -> None:
        """A request of `tokens` expected output began waiting for a slot on `agent`."""
        i = self._index[agent]
        self._nodes[i].queued += 1
        self._nodes[i].queued_tokens += as_estimate(tokens).mean
        self._sync(i)

    def dequeued(self, agent: str, tokens: Tokens) -> None:
        """A request stopped waiting on `agent` (started there, or gave up)."""
        i = self._index.get(agent)
        if i is not None and self._nodes[i].queued:
            node = self._nodes[i]
            node.queued -= 1
            node.queued_tokens = max(node.queued_tokens - as_estimate(tokens).mean, 0.0)
            if not node.queued:
                node.queued_tokens = 0.0
            self._sync(i)

    def in_flight(self, agent: str) -> list[tuple[float, LengthEstimate]]:
        """(tokens generated so far, as the node model estimates them, and the estimate) of
        each request in flight on `agent`."""
        i = self._index[agent]
        node = self._nodes[i]
        node.advance(self.now())
        return [(node.vs - s.start, s.estimate) for s in node.streams.values()]

    def spare(self, agent: str) -> int:
        """Slots free on `agent` now, whoever is waiting for them."""
        node = self._nodes[self._index[agent]]
        return int(node.limit - node.active)

    def has_slot(self, agent: str) -> bool:
        """True when `agent` can start a request now (free slot, nobody waiting)."""
        return bool(self._table[_COL["free"], self._index[agent]])

    def utilization(self) -> np.ndarray:
        """(active + waiting) / limit per node."""
        return self.column("util")

    def cumulative_rate(self) -> list[float]:
        """Running sums of `rate`, for sampling in proportion to it."""
        if self._cum_rate is None:
            self._cum_rate = list(itertools.accumulate(self.rate.tolist()))
        return self._cum_rate

    def join_rate(self) -> np.ndarray:
        """Per-stream decode rate each node would give one more request started now."""
        return self.column("join")

    def full_rate(self) -> np.ndarray:
        """Per-stream decode rate of each node at its concurrency limit (the slowest it gets)."""
        return self.column("full")

    def slot_wait(self) -> np.ndarray:
        """Estimated seconds until a request queued now at each node gets a slot (0 if free).

        A full node keeps its stream rate while it has waiters, so the j-th request in line
        starts when the j-th earliest end mark is reached; past the node's streams, each extra
        waiter adds one mean waiting request's tokens at the node's aggregate rate. End marks are
        expected lengths given each stream's progress, re-estimated here when a stream has run
        past the length its mark assumed.
        """
        col = self.column
        stream = col("stream")
        now = self.now()
        vs_now = col("vs") + (now - col("last")) * stream
        stale = np.flatnonzero(vs_now >= col("check"))
        if stale.size:  # streams that ran past a support point: re-estimate their ends
            for i in stale.tolist():
                node = self._nodes[i]
                node.advance(now)
                node.reestimate()
                self._sync(i)
            vs_now = col("vs") + (now - col("last")) * stream
        unknown = np.flatnonzero(np.isnan(col("next_mark")))
        if unknown.size:
            row = self._table[_COL["next_mark"]]
            for i in unknown.tolist():
                node = self._nodes[i]
                row[i] = node.order_end(min(node.queued, max(node.active - 1, 0)))
        first = np.maximum(col("next_mark") - vs_now, 0.0) / stream
        extra = col("extra_waiters") * col("agg_inv") * col("queued_mean")
        wait = first + extra
        wait[col("free") > 0] = 0.0
        return wait


class Policy(Protocol):
    """Chooses where a request goes; never mutates the fleet.

    `uses_lengths` is False for policies that never read a length estimate (their decisions are
    the same whatever is known of output lengths).
    """

    @property
    def name(self) -> str: ...

    @property
    def uses_lengths(self) -> bool: ...

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision: ...


class RandomPolicy:
    """Uniform over the nodes, whatever their capacity or load (the paper's Random)."""

    name: ClassVar[str] = "random"
    uses_lengths: ClassVar[bool] = False

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision:
        if not len(fleet):
            return CLOUD
        return Decision(fleet.agents[rng.randrange(len(fleet))])


class WeightedPolicy:
    """Random in proportion to each node's token rate (the paper's Weighted)."""

    name: ClassVar[str] = "weighted"
    uses_lengths: ClassVar[bool] = False

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision:
        if not len(fleet):
            return CLOUD
        cum = fleet.cumulative_rate()
        i = bisect.bisect_right(cum, rng.random() * cum[-1])
        return Decision(fleet.agents[min(i, len(cum) - 1)])


class LoadAwarePolicy:
    """The least utilized node, active/limit, ties broken at random (the paper's Load-Aware)."""

    name: ClassVar[str] = "load_aware"
    uses_lengths: ClassVar[bool] = False

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision:
        if not len(fleet):
            return CLOUD
        util = fleet.utilization()
        ties = np.flatnonzero(util == util.min())
        return Decision(fleet.agents[int(ties[rng.randrange(len(ties))])])


@dataclass(frozen=True, slots=True)
class EarliestFinishPolicy:
    """Ours: the fastest free stream; when all nodes are full, wait rather than pay the cloud.

    With a free slot somewhere, the request starts on the free node where it would finish
    first: its output at the stream rate it would get there, plus the node's extra latency
    (`Fleet.latency`: a neighbour site's round trip; with none, the fastest stream). When every
    node is full, it waits at the node where it is predicted to finish first (`Fleet.slot_wait`
    plus its output at the node's slowest stream rate, plus the extra latency), if that is
    within its deadline `deadline_s + deadline_per_token_s * tokens`; else it goes to the cloud
    at once. Its wait is capped at the deadline minus that service time, so a waiting request
    still ends by its deadline. A large request's service alone nears its deadline, so in a
    surge the large requests go to the cloud first: they free the most edge time per dollar;
    the per-token slope lets them wait somewhat longer than small ones.

    `tokens` is the request's length when it is known exactly. When only a distribution is
    known, it is that distribution's `length_quantile` (a request that may well be long is
    judged as long: it is the one whose wait would end in a long tail), and the deadline gains
    `uncertain_slack_s`, which gives back to the likely-short requests the waiting time the
    quantile takes from them. `Fleet.slot_wait` does the other half: the requests in flight
    are re-estimated as they run.
    """

    name: ClassVar[str] = "earliest_finish"
    uses_lengths: ClassVar[bool] = True
    deadline_s: float = 20.0
    deadline_per_token_s: float = 0.03
    length_quantile: float = 0.8  # of an uncertain length (0: its mean)
    uncertain_slack_s: float = 3.0  # more deadline when the length is uncertain

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision:
        if not len(fleet):
            return CLOUD
        tokens, deadline = self._judged(demand.estimate)
        free, latency = fleet.free, fleet.latency
        if free.any():  # the earliest finish of the free nodes
            finish = np.where(free > 0, latency + tokens / fleet.join_rate(), np.inf)
            return Decision(fleet.agents[int(finish.argmin())])
        service = tokens / fleet.full_rate()
        finish = fleet.slot_wait() + service + latency
        i = int(finish.argmin())
        deadline += self.deadline_per_token_s * tokens
        if finish[i] > deadline:
            return CLOUD
        return Decision(fleet.agents[i], max_wait_s=float(deadline - service[i] - latency[i]))

    def _judged(self, estimate: LengthEstimate) -> tuple[float, float]:
        """The length a request is judged by, and its deadline before the per-token slope."""
        if estimate.exact:
            return estimate.mean, self.deadline_s
        q = self.length_quantile
        tokens = estimate.quantile(q) if q else estimate.mean
        return tokens, self.deadline_s + self.uncertain_slack_s


POLICIES: dict[str, Callable[[], Policy]] = {
    p.name: p for p in (RandomPolicy, WeightedPolicy, LoadAwarePolicy, EarliestFinishPolicy)
}


def make_policy(name: str, **params: float) -> Policy:
    """The policy called `name` with its constants (e.g. deadline_s); ValueError says why not."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid: {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**params)  # type: ignore[call-arg]
    except TypeError:
        raise ValueError(f"policy {name!r} takes no parameters {sorted(params)}") from None
