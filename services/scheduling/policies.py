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


@dataclass(frozen=True, slots=True)
class Demand:
    """What a policy knows of a request: its prompt and its expected output tokens."""

    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes: agent None is the cloud; a full agent may be waited on max_wait_s."""

    agent: str | None
    max_wait_s: float = 0.0


CLOUD = Decision(None)


@dataclass(slots=True)
class _Node:
    """One node's state in plain floats; `Fleet` mirrors what decisions read into arrays."""

    rate: float
    limit: int
    beta: float
    active: int = 0
    queued: int = 0
    queued_tokens: int = 0
    vs: float = 0.0  # service each stream has had since the node was last idle (tokens)
    last: float = 0.0  # when vs was brought up to date
    ends: list[float] = field(default_factory=list)  # sorted vs marks at which streams end

    def stream_rate(self, k: int) -> float:
        return self.rate * max(k, 1) ** (self.beta - 1.0)

    def advance(self, now: float) -> None:
        if self.active:
            self.vs += (now - self.last) * self.stream_rate(self.active)
        self.last = now

    def row(self) -> tuple[float, ...]:
        """The values of `_COLUMNS`, in order."""
        k, q = self.active, self.queued
        stream = self.stream_rate(k)
        j = min(q, max(k - 1, 0))  # a newcomer starts when the (j+1)-th earliest stream ends
        next_mark = self.ends[j] if k else math.inf
        return (
            self.rate, self.limit, k, q, (k + q) / self.limit,
            float(k < self.limit and not q), self.stream_rate(k + 1),
            self.rate * self.limit ** (self.beta - 1.0), stream, self.vs, self.last,
            next_mark, q - j, 1.0 / (stream * max(k, 1)), self.queued_tokens / q if q else 0.0,
        )  # fmt: skip


_COLUMNS = (
    "rate", "limit", "active", "queued", "util", "free", "join", "full", "stream", "vs", "last",
    "next_mark", "extra_waiters", "agg_inv", "queued_mean",
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

    def _sync(self, i: int) -> None:
        self._table[:, i] = self._nodes[i].row()

    def upsert(
        self, agent: str, *, tokens_per_s: float, concurrency: int, beta: float = 0.5
    ) -> None:
        """Add a node or update its capacity; its in-flight accounting is kept."""
        if tokens_per_s <= 0 or concurrency < 1:
            raise ValueError(f"{agent}: tokens_per_s must be > 0 and concurrency >= 1")
        i = self._index.get(agent)
        if i is None:
            i = self._append(agent, _Node(tokens_per_s, concurrency, beta, last=self.now()))
        node = self._nodes[i]
        node.advance(self.now())
        node.rate, node.limit, node.beta = tokens_per_s, concurrency, beta
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

    def started(self, agent: str, output_tokens: int) -> None:
        """A request of `output_tokens` expected tokens began on `agent`."""
        i = self._index[agent]
        node = self._nodes[i]
        node.advance(self.now())
        bisect.insort(node.ends, node.vs + output_tokens)
        node.active += 1
        self._sync(i)

    def finished(self, agent: str, output_tokens: int) -> None:
        """A request on `agent` ended (done, failed or cancelled)."""
        i = self._index.get(agent)
        if i is None or not self._nodes[i].active:
            return
        node = self._nodes[i]
        node.advance(self.now())
        node.ends.pop(0)  # under processor sharing the earliest mark ends first
        node.active -= 1
        if not node.active:
            node.vs = 0.0  # an idle node forgets the estimate's drift
        self._sync(i)

    def enqueued(self, agent: str, output_tokens: int) -> None:
        """A request began waiting for a slot on `agent`."""
        i = self._index[agent]
        self._nodes[i].queued += 1
        self._nodes[i].queued_tokens += output_tokens
        self._sync(i)

    def dequeued(self, agent: str, output_tokens: int) -> None:
        """A request stopped waiting on `agent` (started there, or gave up)."""
        i = self._index.get(agent)
        if i is not None and self._nodes[i].queued:
            self._nodes[i].queued -= 1
            self._nodes[i].queued_tokens -= output_tokens
            self._sync(i)

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
        waiter adds one mean waiting request's tokens at the node's aggregate rate.
        """
        col = self.column
        stream = col("stream")
        vs_now = col("vs") + (self.now() - col("last")) * stream
        first = np.maximum(col("next_mark") - vs_now, 0.0) / stream
        extra = col("extra_waiters") * col("agg_inv") * col("queued_mean")
        wait = first + extra
        wait[col("free") > 0] = 0.0
        return wait


class Policy(Protocol):
    """Chooses where a request goes; never mutates the fleet."""

    @property
    def name(self) -> str: ...

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision: ...


class RandomPolicy:
    """Uniform over the nodes, whatever their capacity or load (the paper's Random)."""

    name: ClassVar[str] = "random"

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision:
        if not len(fleet):
            return CLOUD
        return Decision(fleet.agents[rng.randrange(len(fleet))])


class WeightedPolicy:
    """Random in proportion to each node's token rate (the paper's Weighted)."""

    name: ClassVar[str] = "weighted"

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision:
        if not len(fleet):
            return CLOUD
        cum = fleet.cumulative_rate()
        i = bisect.bisect_right(cum, rng.random() * cum[-1])
        return Decision(fleet.agents[min(i, len(cum) - 1)])


class LoadAwarePolicy:
    """The least utilized node, active/limit, ties broken at random (the paper's Load-Aware)."""

    name: ClassVar[str] = "load_aware"

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision:
        if not len(fleet):
            return CLOUD
        util = fleet.utilization()
        ties = np.flatnonzero(util == util.min())
        return Decision(fleet.agents[int(ties[rng.randrange(len(ties))])])


@dataclass(frozen=True, slots=True)
class EarliestFinishPolicy:
    """Ours: the fastest free stream; when all nodes are full, wait rather than pay the cloud.

    With a free slot somewhere, the request starts on the free node that gives it the fastest
    stream. When every node is full, it waits at the node where it is predicted to finish
    first (`Fleet.slot_wait` plus its output at the node's slowest stream rate), if that is
    within its deadline `deadline_s + deadline_per_token_s * output_tokens`; else it goes to
    the cloud at once. Its wait is capped at the deadline minus that service time, so a waiting
    request still ends by its deadline. A large request's service alone nears its deadline,
    so in a surge the large requests go to the cloud first: they free the most edge time per
    dollar; the per-token slope lets them wait somewhat longer than small ones.
    """

    name: ClassVar[str] = "earliest_finish"
    deadline_s: float = 20.0
    deadline_per_token_s: float = 0.03

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision:
        if not len(fleet):
            return CLOUD
        free = fleet.free
        if free.any():
            return Decision(fleet.agents[int((free * fleet.join_rate()).argmax())])
        service = demand.output_tokens / fleet.full_rate()
        finish = fleet.slot_wait() + service
        i = int(finish.argmin())
        deadline = self.deadline_s + self.deadline_per_token_s * demand.output_tokens
        if finish[i] > deadline:
            return CLOUD
        return Decision(fleet.agents[i], max_wait_s=float(deadline - service[i]))


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
