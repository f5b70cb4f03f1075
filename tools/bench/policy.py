"""`edgecollab bench policy`: microseconds per allocation decision, per policy and fleet size.

The fleet is loaded like a surge (every node full, two in three with waiters), so
`earliest_finish` takes its slower, all-full path; prints JSON.
"""

from __future__ import annotations

import argparse
import random
import time

import orjson

from services.scheduling.policies import POLICIES, Demand, Fleet, make_policy


def busy_fleet(size: int, rng: random.Random) -> Fleet:
    """`size` nodes, AGX-Orin-like and Orin-Nano-like, all full, two in three with waiters."""
    fleet = Fleet(clock=lambda: 100.0)
    for i in range(size):
        rate, limit = (60.0, 8) if i % 3 == 0 else (27.7, 4)
        agent = f"node-{i}"
        fleet.upsert(agent, tokens_per_s=rate, concurrency=limit)
        for _ in range(limit):
            fleet.started(agent, rng.choice((50, 100, 200, 300, 500)))
        for _ in range(i % 3):
            fleet.enqueued(agent, 100)
    return fleet


def time_decisions(policy_name: str, fleet: Fleet, decisions: int, rng: random.Random) -> float:
    """Mean µs per `choose` call over `decisions` calls."""
    policy = make_policy(policy_name)
    demands = [Demand(150, rng.choice((50, 100, 200, 300, 500))) for _ in range(decisions)]
    start = time.perf_counter()
    for demand in demands:
        policy.choose(demand, fleet, rng)
    return (time.perf_counter() - start) / decisions * 1e6


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    results: dict[str, dict[str, float]] = {name: {} for name in POLICIES}
    for size in args.nodes:
        fleet = busy_fleet(size, rng)
        for name in POLICIES:
            results[name][str(size)] = round(time_decisions(name, fleet, args.decisions, rng), 2)
    print(orjson.dumps({"us_per_decision": results}, option=orjson.OPT_INDENT_2).decode())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("policy", help="µs per allocation decision at 8, 100, 1000 nodes")
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 100, 1000])
    parser.add_argument("--decisions", type=int, default=2000, help="calls timed per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
