"""`edgecollab bench policy`: microseconds per allocation decision, per policy and fleet size.

The fleet is loaded like a surge (every node full, two in three with waiters), so
`earliest_finish` takes its slower, all-full path. Lengths are predicted distributions (a
predictor fed with the paper's token demands, no labels) unless `--knowledge oracle`, where
every length is known exactly; prints JSON.
"""

from __future__ import annotations

import argparse
import random
import time

import orjson

from services.scheduling.lengths import LengthEstimate, LengthPredictor
from services.scheduling.policies import POLICIES, Demand, Fleet, make_policy

SIZES, WEIGHTS = (50, 100, 200, 300, 500), (0.35, 0.25, 0.20, 0.12, 0.08)


def lengths(rng: random.Random, knowledge: str) -> list[LengthEstimate]:
    """Estimates to draw from: the five sizes exactly, or what a trained predictor says."""
    if knowledge == "oracle":
        return [LengthEstimate.exactly(n, 512) for n in SIZES]
    predictor = LengthPredictor()
    for n in rng.choices(SIZES, WEIGHTS, k=2000):
        predictor.observe(n)
    return [predictor.predict(max_tokens=512)]


def busy_fleet(
    size: int, rng: random.Random, knowledge: str = "predicted"
) -> tuple[Fleet, dict[str, list[int]]]:
    """`size` nodes, AGX-Orin-like and Orin-Nano-like, all full, two in three with waiters;
    and each node's tickets."""
    clock = [100.0]
    fleet = Fleet(clock=lambda: clock[0])
    estimates = lengths(rng, knowledge)
    tickets: dict[str, list[int]] = {}
    for i in range(size):
        rate, limit = (60.0, 8) if i % 3 == 0 else (27.7, 4)
        agent = f"node-{i}"
        fleet.upsert(agent, tokens_per_s=rate, concurrency=limit)
        tickets[agent] = []
        for _ in range(limit):
            clock[0] -= rng.random()  # streams that started at different times
            tickets[agent].append(fleet.started(agent, rng.choice(estimates)))
        clock[0] = 100.0
        for _ in range(i % 3):
            fleet.enqueued(agent, rng.choice(estimates))
    return fleet, tickets


def time_decisions(
    policy_name: str,
    fleet: Fleet,
    decisions: int,
    rng: random.Random,
    knowledge: str,
    tickets: dict[str, list[int]] | None = None,
) -> float:
    """Mean µs per `choose` call over `decisions` calls (after one untimed call); with
    `tickets`, one random node's oldest request is replaced by a new one before each call
    (timed too), as when requests end and start between decisions in a surge."""
    policy = make_policy(policy_name)
    estimates = lengths(rng, knowledge)
    demands = [Demand(150, rng.choice(estimates)) for _ in range(decisions)]
    agents = list(tickets or ())
    churn = [rng.choice(agents) for _ in range(decisions)] if tickets else []
    policy.choose(demands[0], fleet, rng)
    start = time.perf_counter()
    for i, demand in enumerate(demands):
        if tickets:
            agent = churn[i]
            fleet.finished(agent, tickets[agent].pop(0))
            tickets[agent].append(fleet.started(agent, demands[i].estimate))
        policy.choose(demand, fleet, rng)
    return (time.perf_counter() - start) / decisions * 1e6


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    results: dict[str, dict[str, float]] = {name: {} for name in POLICIES}
    churned: dict[str, dict[str, float]] = {name: {} for name in POLICIES}
    for size in args.nodes:
        fleet, tickets = busy_fleet(size, rng, args.knowledge)
        for name in POLICIES:
            us = time_decisions(name, fleet, args.decisions, rng, args.knowledge)
            results[name][str(size)] = round(us, 2)
            us = time_decisions(name, fleet, args.decisions, rng, args.knowledge, tickets)
            churned[name][str(size)] = round(us, 2)
    report = {
        "knowledge": args.knowledge,
        "us_per_decision": results,
        "us_per_decision_with_one_replaced_request": churned,
    }
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("policy", help="µs per allocation decision at 8, 100, 1000 nodes")
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 100, 1000])
    parser.add_argument("--decisions", type=int, default=2000, help="calls timed per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--knowledge", choices=("predicted", "oracle"), default="predicted")
    parser.set_defaults(func=run)
