"""`edgecollab simulate --sites N`: the experiment at N sites a round trip apart.

Every site has the experiment's fleet and its own bursty load, with the surges out of phase
(site k's start k/N of a surge period after site 1's). Each policy runs twice over the same
arrivals: every site alone (what it cannot serve goes to the cloud), and with neighbour offload
(what a site would send to the cloud takes a free slot at another site first, paying the round
trip; `engine.Sites`). The report compares each site's cloud cost and p95 latency between the two.
"""

from __future__ import annotations

import dataclasses
import math

from services.scheduling.outcomes import Tally
from services.scheduling.policies import make_policy
from tools.sim.engine import SimResult, Sites, simulate
from tools.sim.experiment import Experiment, runs_of
from tools.sim.workload import Arrival, NodeSpec, WorkloadSpec, generate_workload

MAX_SITES = 64
MAX_RTT_MS = 60_000.0
SEED_STRIDE = 100_003  # site k's load uses seed + k * this: every site its own arrivals
TARGET = {"cloud_cost": 0.5, "p95": 1.2}  # offload over alone, at every site (issue 14)


def check(sites: int, rtt_ms: float) -> None:
    """ValueError unless `sites` and `rtt_ms` make an experiment."""
    if not 1 <= sites <= MAX_SITES:
        raise ValueError(f"--sites must be 1 to {MAX_SITES}, got {sites}")
    if not (math.isfinite(rtt_ms) and 0 <= rtt_ms <= MAX_RTT_MS):
        raise ValueError(f"--site-rtt-ms must be a number from 0 to {MAX_RTT_MS:g}, got {rtt_ms}")


def site_nodes(nodes: list[NodeSpec], sites: int) -> tuple[list[NodeSpec], list[int]]:
    """`nodes` at every site, named `site-<k>-<id>`; and each node's site."""
    named = [
        n.model_copy(update={"id": f"site-{k + 1}-{n.id}"}) for k in range(sites) for n in nodes
    ]
    return named, [k for k in range(sites) for _ in nodes]


def surge_offsets(spec: WorkloadSpec, sites: int) -> list[float]:
    period = spec.surge_period_s
    return [(spec.surge_offset_s + k * period / sites) % period for k in range(sites)]


def site_workload(
    spec: WorkloadSpec, *, sites: int, horizon_s: float, seed: int, load_scale: float
) -> list[Arrival]:
    """Every site's arrivals, surges out of phase, merged in time order."""
    arrivals = []
    for k, offset in enumerate(surge_offsets(spec, sites)):
        shifted = spec.model_copy(update={"surge_offset_s": offset})
        load = generate_workload(
            shifted, horizon_s=horizon_s, seed=seed + k * SEED_STRIDE, load_scale=load_scale
        )
        arrivals += [dataclasses.replace(a, site=k) for a in load]
    return sorted(arrivals, key=lambda a: a.t)


def run_sites(exp: Experiment, of_node: list[int], rtt_ms: float) -> dict[str, object]:
    """The `edgecollab simulate --sites N --json` report."""
    count = max(of_node) + 1
    policies: dict[str, object] = {}
    for key, name, knowledge in runs_of(exp):
        arms = {}
        for arm, offload in (("alone", False), ("offload", True)):
            sites = Sites(of_node, rtt_ms / 1000, offload)
            runs = [
                simulate(
                    w, exp.nodes, make_policy(name), seed=seed, cloud=exp.cloud,
                    knowledge=knowledge, sites=sites,
                )
                for seed, w in exp.workloads.items()
            ]  # fmt: skip
            arms[arm] = _arm(runs, count)
        policies[key] = {**arms, "offload_over_alone": _ratios(arms["alone"], arms["offload"])}
    return {
        "sites": count,
        "rtt_ms": rtt_ms,
        "nodes_per_site": len(of_node) // count,
        "seeds": list(exp.workloads),
        "knowledge": list(exp.knowledge),
        "target": TARGET,
        "policies": policies,
    }


def _arm(runs: list[SimResult], count: int) -> dict[str, object]:
    per_site = []
    for k in range(count):
        tally = Tally()
        for run in runs:
            tally = tally.merge(run.sites[k])
        per_site.append(_short(tally))
    total = Tally()
    for run in runs:
        total = total.merge(run.tally)
    return {**_short(total), "offloaded": sum(r.offloaded for r in runs), "per_site": per_site}


def _short(tally: Tally) -> dict[str, object]:
    return {k: v for k, v in tally.summary().items() if k != "outcomes"}


def _ratios(alone: dict[str, object], offload: dict[str, object]) -> dict[str, object]:
    def ratio(a: object, b: object) -> float | None:
        if not isinstance(a, int | float) or not isinstance(b, int | float) or not a:
            return None
        return round(b / a, 4)

    pairs = list(zip(alone["per_site"], offload["per_site"], strict=True))  # type: ignore[call-overload]
    cost = [ratio(a["cloud_cost_usd"], b["cloud_cost_usd"]) for a, b in pairs]
    p95 = [ratio(a["latency_p95_s"], b["latency_p95_s"]) for a, b in pairs]
    met = all(c is not None and c <= TARGET["cloud_cost"] for c in cost) and all(
        p is not None and p <= TARGET["p95"] for p in p95
    )
    return {
        "cloud_cost": cost,
        "p95": p95,
        "total_cloud_cost": ratio(alone["cloud_cost_usd"], offload["cloud_cost_usd"]),
        "total_p95": ratio(alone["latency_p95_s"], offload["latency_p95_s"]),
        "target_met": met,
    }


def table(report: dict[str, object]) -> str:
    """The report as text: per policy and arm, each site's cloud cost and p95."""
    head = f"{report['sites']} sites, {report['rtt_ms']:g} ms apart, surges out of phase"
    lines = [head, f"{'policy':>16} {'arm':>8} {'offloaded':>9}  cloud $ / p95 s per site"]
    policies = report["policies"]
    assert isinstance(policies, dict)
    for key, result in policies.items():
        for arm in ("alone", "offload"):
            run = result[arm]
            cells = "  ".join(
                f"{s['cloud_cost_usd']:.2f}/{s['latency_p95_s'] or 0:.2f}" for s in run["per_site"]
            )
            lines.append(f"{key:>16} {arm:>8} {run['offloaded']:>9}  {cells}")
        ratios = result["offload_over_alone"]
        lines.append(
            f"{'':>16} {'ratio':>8} {'':>9}  cost {ratios['cloud_cost']}, p95 {ratios['p95']}"
            f"{'  (target met)' if ratios['target_met'] else ''}"
        )
    return "\n".join(lines)
