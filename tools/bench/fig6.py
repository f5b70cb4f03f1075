"""`edgecollab bench fig6`: the paper's experiment live, beside the simulator on the same trace.

Eight emulated workers (the default fleet) and the real orchestrator run as processes on a
broker this bench starts; the cloud is a local OpenAI-compatible server with the simulator's
latency model. Everything runs `--speedup` times faster than real time: token rates × S, trace
times, cloud latency and policy time constants ÷ S; latencies are reported in real seconds.
Prints JSON: per policy the live and simulated columns and whether they agree.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from schemas import Answer, Query
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import EdgecollabError
from services.core.logging import configure_logging
from services.core.settings import MqttSettings
from services.core.topics import QUERIES
from services.scheduling.outcomes import Outcome, Tally
from services.scheduling.policies import POLICIES
from tools.bench.fake_cloud import FakeCloud
from tools.common import print_json, running, spawn, stop
from tools.common.broker import LocalBroker
from tools.sim.engine import simulate
from tools.sim.workload import (
    Arrival,
    NodeSpec,
    Scenario,
    generate_workload,
    load_scenario,
)

COLUMNS = (
    "requests",
    "processed_edge",
    "rejected_edge",
    "cloud",
    "failed",
    "cloud_cost_usd",
    "latency_mean_s",
    "latency_p95_s",
    "utilization_mean",
)
TOLERANCE = 0.10  # relative, against the simulator
COUNT_FLOOR = 0.005  # counts may also differ by 0.5% of all requests (small counts are noise)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("fig6", help="the paper's experiment live over MQTT vs the simulator")
    parser.add_argument("--policy", action="append", help="repeatable, or 'all' (default)")
    parser.add_argument("--speedup", type=float, default=10.0, help="times faster than real")
    parser.add_argument("--horizon", type=float, help="simulated seconds (default: the file's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-scale", type=float, default=1.0)
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


async def bench(args: argparse.Namespace) -> int:
    configure_logging("bench", level="warning")
    scenario = load_scenario()
    policies = list(POLICIES) if not args.policy or "all" in args.policy else args.policy
    horizon = args.horizon or scenario.horizon_s
    requests = generate_workload(
        scenario.workload, horizon_s=horizon, seed=args.seed, load_scale=args.load_scale
    )
    nodes = scenario.nodes()
    report = {
        "speedup": args.speedup,
        "horizon_s": horizon,
        "seed": args.seed,
        "requests": len(requests),
        "tolerance": TOLERANCE,
        "policies": {},
    }
    with tempfile.TemporaryDirectory() as tmp, _cloud(scenario, args.speedup) as cloud:
        broker = LocalBroker(Path(tmp))
        broker.start()
        workers = [_start_worker(node, args.speedup, broker) for node in nodes]
        try:
            for name in policies:
                live = await _run_live(name, requests, nodes, broker, cloud, args)
                sim = simulate(
                    requests, nodes, POLICIES[name](), seed=args.seed, cloud=scenario.cloud
                )
                simulated = _columns(sim.tally, sim.utilization)
                report["policies"][name] = {
                    "live": live,
                    "simulated": simulated,
                    "agreement": _agreement(live, simulated, len(requests)),
                }
                _progress(f"{name}: done")
        finally:
            stop(*workers)
            broker.stop()
    report["all_agree"] = all(
        p["agreement"]["all"]
        for p in report["policies"].values()  # type: ignore[union-attr]
    )
    print_json(report)
    return 0


def _cloud(scenario: Scenario, speedup: float) -> FakeCloud:
    latency = (scenario.cloud.ttft_s / speedup, scenario.cloud.decode_tok_s * speedup)
    return FakeCloud(echo_max_tokens=True, latency=latency)


def _start_worker(node: NodeSpec, speedup: float, broker: LocalBroker) -> subprocess.Popen[bytes]:
    return _spawn(
        [
            "services.worker",
            "--agent-id",
            node.id,
            "--tokens-per-s",
            str(node.tokens_per_s * speedup),
            "--concurrency",
            str(node.concurrency),
            "--batching-beta",
            str(node.batching_beta),
        ],
        broker.login(node.id, "worker"),
        broker,
    )


def _start_orchestrator(
    name: str, agent: str, speedup: float, broker: LocalBroker, cloud: FakeCloud, seed: int
) -> subprocess.Popen[bytes]:
    policy = POLICIES[name]
    params = {}  # a policy's time constants are its fields named *_s: divide them by S
    if dataclasses.is_dataclass(policy):
        fields = dataclasses.fields(policy)
        params = {f.name: f.default / speedup for f in fields if f.name.endswith("_s")}
    return _spawn(
        [
            "services.orchestrator",
            "--agent-id",
            agent,
            "--policy",
            name,
            "--policy-params",
            orjson.dumps(params).decode(),
            "--seed",
            str(seed),
            "--cloud-url",
            cloud.url,
            "--cloud-api-key",
            cloud.api_key,
            "--cloud-retries",
            "0",
        ],
        broker.login(agent, "orchestrator"),
        broker,
    )


async def _run_live(
    name: str,
    requests: list[Arrival],
    nodes: list[NodeSpec],
    broker: LocalBroker,
    cloud: FakeCloud,
    args: argparse.Namespace,
) -> dict[str, object]:
    agent = f"fig6-{name.replace('_', '-')}-{uuid.uuid4().hex[:4]}"
    orchestrator = _start_orchestrator(name, agent, args.speedup, broker, cloud, args.seed)
    client = f"fig6-client-{uuid.uuid4().hex[:6]}"
    bus = Bus(settings=broker.login(client), client_id=client, service="bench")
    view = CmsView(bus)
    try:
        async with running(bus):
            if not await view.wait_online([agent, *(n.id for n in nodes)]):
                raise SystemExit(f"fig6: the stack did not come online ({agent})")
            tally, busy, span = await _replay(bus, requests, args.speedup, name)
    finally:
        await asyncio.to_thread(stop, orchestrator)
    utilization = [busy.get(n.id, 0.0) / (n.concurrency * span) for n in nodes]
    return _columns(tally, utilization)


async def _replay(
    bus: Bus, requests: list[Arrival], speedup: float, name: str
) -> tuple[Tally, dict[str, float], float]:
    """Send each request at its (compressed) time; latency and busy time in real seconds."""
    loop = asyncio.get_running_loop()
    tally, busy = Tally(), dict[str, float]()
    start = loop.time()
    last_end = start

    async def one(r: Arrival) -> None:
        nonlocal last_end
        deadline = time.time() + 600 / speedup + 30
        text = "w " * r.prompt_tokens  # the fake cloud counts words as prompt tokens
        query = Query(
            request_id=uuid.uuid4().hex, text=text, max_tokens=r.output_tokens, deadline=deadline
        )
        sent = loop.time()
        try:
            answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
        except EdgecollabError:
            tally.record(Outcome.FAILED, latency_s=None)
            return
        assert isinstance(answer, Answer)
        last_end = max(last_end, loop.time())
        outcome = Outcome(answer.outcome)
        answered = outcome not in (Outcome.REJECTED, Outcome.FAILED)
        latency = (loop.time() - sent) * speedup if answered else None
        tally.record(outcome, latency_s=latency, cost_usd=answer.cost_usd)
        for step in answer.steps:
            if step.where == "edge" and step.outcome == "ok" and step.agent:
                busy[step.agent] = busy.get(step.agent, 0.0) + step.ms / 1000 * speedup

    tasks = []
    for i, r in enumerate(requests):
        await asyncio.sleep(max(0.0, start + r.t / speedup - loop.time()))
        tasks.append(asyncio.create_task(one(r)))
        if i % max(1, len(requests) // 10) == 0:
            _progress(f"{name}: {i}/{len(requests)} sent")
    await asyncio.gather(*tasks)
    return tally, busy, (last_end - start) * speedup


def _columns(tally: Tally, utilization: list[float]) -> dict[str, object]:
    summary = tally.summary()
    summary.pop("outcomes", None)
    summary["utilization"] = [round(u, 4) for u in utilization]
    summary["utilization_mean"] = round(sum(utilization) / len(utilization), 4)
    return summary


def _agreement(live: dict, sim: dict, requests: int) -> dict[str, object]:
    """Per column: |live - sim| <= 10% of sim (counts: or <= 0.5% of all requests)."""
    verdicts: dict[str, object] = {}
    for column in COLUMNS:
        a, b = live.get(column) or 0.0, sim.get(column) or 0.0
        allowed = TOLERANCE * abs(b)
        if column in ("processed_edge", "rejected_edge", "cloud", "failed"):
            allowed = max(allowed, COUNT_FLOOR * requests)
        verdicts[column] = abs(a - b) <= allowed
    verdicts["all"] = all(verdicts.values())
    return verdicts


def _spawn(args: list[str], mqtt: MqttSettings, broker: LocalBroker) -> subprocess.Popen[bytes]:
    return spawn([sys.executable, "-m", *args], mqtt, state_dir=broker.workdir)


def _progress(message: str) -> None:
    print(f"fig6: {message}", file=sys.stderr, flush=True)
