"""A lower bound on the cloud cost of any policy that ends each edge request within a limit.

Relaxation (each step only lowers the optimum, so the result is a valid lower bound):

1. The fleet becomes one fluid server of rate C = Σ tokens_per_s·concurrency**beta: no node
   ever decodes faster than at its concurrency limit, whoever it serves.
2. A request may be split: any fraction of its output tokens is served at the edge, the rest
   in the cloud, paying that fraction of its price less (prices are linear in tokens).
3. Edge work of a request must be done between its arrival and its latency limit (one limit
   for all, or one per output size); nothing else constrains latency. Serving the earliest
   deadline first then loses the least work (`edf_lost_work`).

The fractional problem is a polymatroid (the work that a flow network routes from jobs to
time), so the greedy that keeps the densest requests (USD per output token) is optimal, and
its cost is Σ_k (ρ_k − ρ_{k−1}) · U(ρ_k), where U(ρ) is the work lost when only the requests
of density ≥ ρ are offered. Densities are rounded down to a geometric grid, which lowers
every price and keeps the bound valid.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

import numpy as np

from services.scheduling.outcomes import Prices
from tools.sim.workload import Arrival, NodeSpec


def fleet_capacity(nodes: list[NodeSpec]) -> float:
    """Total decode rate of the fleet with every node at its concurrency limit (tokens/s)."""
    return sum(n.tokens_per_s * n.concurrency**n.batching_beta for n in nodes)


def edf_lost_work(
    release: np.ndarray, deadline: np.ndarray, work: np.ndarray, capacity: float
) -> float:
    """Work a fluid server of rate `capacity` cannot finish by the deadlines, serving EDF.

    With partial credit, EDF loses the least: serving the earliest deadline first only ever
    postpones work that can still wait.
    """
    pending: list[tuple[float, float]] = []  # heap of (deadline, remaining work)
    now, lost = 0.0, 0.0
    arrivals = zip(release.tolist(), deadline.tolist(), work.tolist(), strict=True)
    for t, d, w in [*arrivals, (math.inf, math.inf, 0.0)]:
        while pending and now < t:
            due, rest = pending[0]
            if due <= now:
                heapq.heappop(pending)
                lost += rest
                continue
            done = min(rest, (min(t, due) - now) * capacity)
            now += done / capacity
            if rest - done <= 1e-9:
                heapq.heappop(pending)
            else:
                heapq.heapreplace(pending, (due, rest - done))
        now = max(now, t)
        heapq.heappush(pending, (d, w))
    return lost


def lower_bound_cost(
    requests: list[Arrival],
    nodes: list[NodeSpec],
    prices: Prices,
    *,
    max_latency_s: float | Mapping[int, float],
    levels: int = 24,
) -> float:
    """USD in the cloud that no policy can go below while ending edge requests within
    `max_latency_s` of arrival (one number, or one per output-token size)."""
    if not requests:
        return 0.0
    release = np.array([r.t for r in requests])
    work = np.array([r.output_tokens for r in requests], dtype=float)
    limit = (
        np.array([max_latency_s[r.output_tokens] for r in requests])
        if isinstance(max_latency_s, Mapping)
        else np.full(len(requests), float(max_latency_s))
    )
    density = np.array([prices.cost(r.prompt_tokens, r.output_tokens) for r in requests]) / work
    lo, hi = float(density.min()), float(density.max())
    grid = lo * (hi / lo) ** (np.arange(levels) / levels) if hi > lo else np.array([lo])
    rounded = grid[np.searchsorted(grid, density, side="right") - 1]
    capacity = fleet_capacity(nodes)
    bound, previous = 0.0, 0.0
    for rho in np.unique(rounded):
        keep = rounded >= rho
        lost = edf_lost_work(release[keep], release[keep] + limit[keep], work[keep], capacity)
        bound += (float(rho) - previous) * lost
        previous = float(rho)
    return bound
