"""Run several policies over several seeds of one workload and fleet; aggregate the report."""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduling.outcomes import Outcome, Tally
from services.scheduling.policies import make_policy
from tools.sim.bound import lower_bound_cost
from tools.sim.engine import SimResult, simulate
from tools.sim.workload import Arrival, CloudModel, NodeSpec


@dataclass(frozen=True, slots=True)
class Experiment:
    """What to run: the fleet, one workload per seed, the policies, the cloud (None: no cloud)."""

    nodes: list[NodeSpec]
    workloads: dict[int, list[Arrival]]  # seed -> requests
    policies: list[str]
    cloud: CloudModel | None
    bound_latency_s: float | None = None  # None: the longest edge latency any policy had


def run_experiment(exp: Experiment) -> dict[str, object]:
    """The `edgecollab simulate --json` report."""
    results = {
        name: {seed: simulate(w, exp.nodes, make_policy(name), seed=seed, cloud=exp.cloud)
               for seed, w in exp.workloads.items()}
        for name in exp.policies
    }  # fmt: skip
    report: dict[str, object] = {
        "nodes": [n.id for n in exp.nodes],
        "seeds": list(exp.workloads),
        "policies": {name: _policy_report(runs) for name, runs in results.items()},
    }
    if exp.cloud is not None and exp.policies:
        report["lower_bound"] = _bound_report(exp, results)
    return report


def _policy_report(runs: dict[int, SimResult]) -> dict[str, object]:
    total = Tally()
    for result in runs.values():
        total = total.merge(result.tally)
    per_seed = [
        {
            "seed": seed,
            **_short(r.tally.summary()),
            "max_edge_latency_s": round(r.max_edge_latency_s, 3),
        }
        for seed, r in runs.items()
    ]
    nodes = len(next(iter(runs.values())).utilization)
    util = [
        round(sum(r.utilization[i] for r in runs.values()) / len(runs), 4) for i in range(nodes)
    ]
    return {**total.summary(), "utilization": util, "per_seed": per_seed}


def _short(summary: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in summary.items() if k != "outcomes"}


def _bound_report(exp: Experiment, results: dict[str, dict[int, SimResult]]) -> dict[str, object]:
    """Lower bound summed over seeds; latency limits per output size from the runs themselves."""
    assert exp.cloud is not None
    total, limits = 0.0, []
    for seed, workload in exp.workloads.items():
        limit = exp.bound_latency_s or _edge_latency_limits(
            workload, [r[seed] for r in results.values()]
        )
        limits.append(limit)
        total += lower_bound_cost(workload, exp.nodes, exp.cloud.prices, max_latency_s=limit)
    ratios = {
        name: (
            round(sum(r.tally.cloud_cost_usd for r in runs.values()) / total, 3) if total else None
        )
        for name, runs in results.items()
    }
    return {"cloud_cost_usd": round(total, 6), "max_latency_s": limits, "ratio": ratios}


def _edge_latency_limits(workload: list[Arrival], runs: list[SimResult]) -> dict[int, float]:
    """Per output size, the longest edge latency any of the runs had (0 if none at the edge)."""
    limits = dict.fromkeys(sorted({r.output_tokens for r in workload}), 0.0)
    for run in runs:
        for request, outcome, latency in zip(workload, run.outcomes, run.latencies_s, strict=True):
            if outcome is Outcome.EDGE and latency is not None:
                size = request.output_tokens
                limits[size] = max(limits[size], round(latency, 3))
    return limits
