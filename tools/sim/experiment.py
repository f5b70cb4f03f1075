"""Run several policies over several seeds of one workload and fleet; aggregate the report.

Each policy that reads length estimates runs once per knowledge level (`oracle`, `predicted`,
`max_tokens`; its report key is `policy@knowledge` when more than one level is asked); the
others run once, as what they decide does not depend on it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from services.scheduling.lengths import prediction_errors
from services.scheduling.outcomes import Outcome, Tally
from services.scheduling.policies import make_policy
from tools.sim.bound import lower_bound_cost
from tools.sim.engine import Knowledge, SimResult, simulate
from tools.sim.workload import Arrival, CloudModel, NodeSpec

BASELINE = "load_aware"


@dataclass(frozen=True, slots=True)
class Experiment:
    """What to run: the fleet, one workload per seed, the policies, the cloud (None: no cloud)."""

    nodes: list[NodeSpec]
    workloads: dict[int, list[Arrival]]  # seed -> requests
    policies: list[str]
    cloud: CloudModel | None
    bound_latency_s: float | None = None  # None: the longest edge latency any policy had
    knowledge: list[Knowledge] = field(default_factory=lambda: ["predicted"])


def runs_of(exp: Experiment) -> list[tuple[str, str, Knowledge]]:
    """(report key, policy, knowledge) of every run the experiment asks for."""
    runs: list[tuple[str, str, Knowledge]] = []
    for name in exp.policies:
        if not make_policy(name).uses_lengths:
            runs.append((name, name, exp.knowledge[0]))
            continue
        for k in exp.knowledge:
            runs.append((name if len(exp.knowledge) == 1 else f"{name}@{k}", name, k))
    return runs


def run_experiment(exp: Experiment) -> dict[str, object]:
    """The `edgecollab simulate --json` report."""
    results: dict[str, dict[int, SimResult]] = {}
    for key, name, k in runs_of(exp):
        results[key] = {
            seed: simulate(w, exp.nodes, make_policy(name), seed=seed, cloud=exp.cloud, knowledge=k)
            for seed, w in exp.workloads.items()
        }
    policies = {}
    for key, name, k in runs_of(exp):
        uses = make_policy(name).uses_lengths
        policies[key] = {**_policy_report(results[key]), "knowledge": k if uses else "any"}
        if uses and k == "predicted":
            policies[key]["length_prediction"] = _prediction_report(exp, results[key])
    report: dict[str, object] = {
        "nodes": [n.id for n in exp.nodes],
        "seeds": list(exp.workloads),
        "knowledge": list(exp.knowledge),
        "policies": policies,
        "label_signal": label_signal(exp.workloads),
    }
    if BASELINE in policies:
        report["versus_load_aware"] = _versus(policies, runs_of(exp))
    if exp.cloud is not None and exp.policies:
        report["lower_bound"] = _bound_report(exp, results)
    return report


def _prediction_report(exp: Experiment, runs: dict[int, SimResult]) -> dict[str, object]:
    """Error of the lengths predicted at arrival (the estimate's mean), over every seed."""
    predicted = [x for r in runs.values() for x in r.predicted_tokens]
    true = [a.output_tokens for seed in runs for a in exp.workloads[seed]]
    return prediction_errors(predicted, true)


def label_signal(workloads: dict[int, list[Arrival]]) -> dict[str, object]:
    """How much the labels tell of lengths: the errors of the best point prediction from
    (domain, difficulty) alone, the per-key mean fitted on the whole trace in hindsight."""
    groups: dict[tuple[str, str | None], list[int]] = defaultdict(list)
    for w in workloads.values():
        for a in w:
            groups[(a.domain, a.difficulty)].append(a.output_tokens)
    means = {key: sum(v) / len(v) for key, v in groups.items()}
    arrivals = [a for w in workloads.values() for a in w]
    return {
        "keys": len(groups),
        **prediction_errors(
            [means[(a.domain, a.difficulty)] for a in arrivals], [a.output_tokens for a in arrivals]
        ),
    }


def _versus(
    policies: dict[str, dict[str, object]], runs: list[tuple[str, str, Knowledge]]
) -> dict[str, object]:
    """Cloud cost and p95 latency of each run over load_aware's; the share of the oracle's
    cost saving (below load_aware) that each other knowledge level keeps."""

    def number(key: str, column: str) -> float:
        value = policies[key][column]
        return float(value) if isinstance(value, int | float) else 0.0

    base_cost, base_p95 = number(BASELINE, "cloud_cost_usd"), number(BASELINE, "latency_p95_s")
    ratios = {
        key: {
            "cost": round(number(key, "cloud_cost_usd") / base_cost, 4) if base_cost else None,
            "p95": round(number(key, "latency_p95_s") / base_p95, 4) if base_p95 else None,
        }
        for key in policies
    }
    levels: dict[str, dict[str, str]] = defaultdict(dict)
    for key, name, k in runs:
        levels[name][k] = key
    kept: dict[str, float] = {}
    for by_level in levels.values():
        oracle = by_level.get("oracle")
        gain = base_cost - number(oracle, "cloud_cost_usd") if oracle else 0.0
        for k, key in by_level.items():
            if k != "oracle" and gain > 0:
                kept[key] = round((base_cost - number(key, "cloud_cost_usd")) / gain, 4)
    return {"ratios": ratios, "oracle_gain_kept": kept}


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
