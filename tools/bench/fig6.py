"""`edgecollab bench fig6`: the paper's experiment live, beside the simulator on the same trace.

Eight emulated workers (the default fleet), the real orchestrator and a stand-in classifier
(`tools/bench/labels.py`: the trace's domain and difficulty) run as processes on a broker this
bench starts; the cloud is a local OpenAI-compatible server with the simulator's latency
model. Everything runs `--speedup` times faster than real time: token rates × S, trace times,
cloud latency and policy time constants ÷ S; latencies are reported in real seconds.

Each query carries its request's true length as the word `eos@N`, where the emulated workers
and the fake cloud end their answers (a real model decides by itself); the orchestrator never
reads it. Knowledge levels, as in the simulator: `predicted` (the orchestrator's length
predictor, learned from finished answers), `max_tokens` (the cap alone), `oracle` (each query's
max_tokens is its true length, and the orchestrator uses max_tokens: clairvoyant).
Prints JSON: per policy and knowledge the live and simulated columns and whether they agree.
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
from services.core.client import QueryClient
from services.core.cms import CmsView
from services.core.errors import EdgecollabError
from services.core.logging import configure_logging
from services.core.settings import MqttSettings
from services.scheduling.outcomes import Outcome, Tally
from services.scheduling.policies import POLICIES
from services.worker.emulated import eos_word
from tools.bench.fake_cloud import FakeCloud
from tools.bench.labels import label_word
from tools.common import print_json, running, spawn, stop
from tools.common.broker import LocalBroker
from tools.sim.engine import KNOWLEDGE, Knowledge, simulate
from tools.sim.experiment import Experiment, runs_of
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
LABELS = "fig6-labels"  # the stand-in classifier's agent id
COUNT_FLOOR = 0.005  # counts may also differ by 0.5% of all requests (small counts are noise)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("fig6", help="the paper's experiment live over MQTT vs the simulator")
    parser.add_argument("--policy", action="append", help="repeatable, or 'all' (default)")
    parser.add_argument("--speedup", type=float, default=10.0, help="times faster than real")
    parser.add_argument("--horizon", type=float, help="simulated seconds (default: the file's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-scale", type=float, default=1.0)
    parser.add_argument(
        "--knowledge",
        action="append",
        choices=[*KNOWLEDGE, "all"],
        help="what the policy knows of output lengths, repeatable (default: all)",
    )
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


async def bench(args: argparse.Namespace) -> int:
    configure_logging("bench", level="warning")
    scenario = load_scenario()
    policies = list(POLICIES) if not args.policy or "all" in args.policy else args.policy
    levels = args.knowledge or ["all"]
    knowledge: list[Knowledge] = list(KNOWLEDGE) if "all" in levels else list(dict.fromkeys(levels))
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
        "knowledge": knowledge,
        "policies": {},
    }
    runs = runs_of(Experiment(nodes, {args.seed: requests}, policies, None, knowledge=knowledge))
    with tempfile.TemporaryDirectory() as tmp, _cloud(scenario, args.speedup) as cloud:
        broker = LocalBroker(Path(tmp))
        broker.start()
        workers = [_start_worker(node, args.speedup, broker) for node in nodes]
        workers.append(
            _spawn(["tools.bench.labels", LABELS], broker.login(LABELS, "classifier"), broker)
        )
        try:
            for key, name, k in runs:
                live = await _run_live(name, k, requests, nodes, broker, cloud, args)
                sim = simulate(
                    requests,
                    nodes,
                    POLICIES[name](),
                    seed=args.seed,
                    cloud=scenario.cloud,
                    knowledge=k,
                )
                simulated = _columns(sim.tally, sim.utilization)
                report["policies"][key] = {
                    "knowledge": k if POLICIES[name].uses_lengths else "any",
                    "live": live,
                    "simulated": simulated,
                    "agreement": _agreement(live, simulated, len(requests)),
                }
                _progress(f"{key}: done")
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
    name: str,
    knowledge: Knowledge,
    agent: str,
    speedup: float,
    broker: LocalBroker,
    cloud: FakeCloud,
    seed: int,
) -> subprocess.Popen[bytes]:
    policy = POLICIES[name]
    # a policy's time constants are its fields named *_s: divide them by S
    params: dict[str, float] = {}
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
            "--knowledge",
            "predicted" if knowledge == "predicted" else "max_tokens",  # oracle: max_tokens = truth
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
    knowledge: Knowledge,
    requests: list[Arrival],
    nodes: list[NodeSpec],
    broker: LocalBroker,
    cloud: FakeCloud,
    args: argparse.Namespace,
) -> dict[str, object]:
    agent = f"fig6-{name.replace('_', '-')}-{uuid.uuid4().hex[:4]}"
    orchestrator = _start_orchestrator(
        name, knowledge, agent, args.speedup, broker, cloud, args.seed
    )
    client = f"fig6-client-{uuid.uuid4().hex[:6]}"
    bus = Bus(settings=broker.login(client), client_id=client, service="bench")
    view = CmsView(bus)
    try:
        async with running(bus):
            if not await view.wait_online([agent, LABELS, *(n.id for n in nodes)]):
                raise SystemExit(f"fig6: the stack did not come online ({agent})")
            tally, busy, span = await _replay(bus, view, requests, args.speedup, name, knowledge)
    finally:
        await asyncio.to_thread(stop, orchestrator)
    utilization = [busy.get(n.id, 0.0) / (n.concurrency * span) for n in nodes]
    return _columns(tally, utilization)


def query_text(r: Arrival) -> str:
    """A query of `r.prompt_tokens` words (the fake cloud counts words as prompt tokens), two
    of them where the emulated models end (`eos@N`) and the stand-in classifier's labels."""
    marks = [w for w in (eos_word(r.output_tokens), label_word(r.domain, r.difficulty)) if w]
    return " ".join([*marks, *["w"] * max(r.prompt_tokens - len(marks), 0)])


async def _replay(
    bus: Bus,
    view: CmsView,
    requests: list[Arrival],
    speedup: float,
    name: str,
    knowledge: Knowledge,
) -> tuple[Tally, dict[str, float], float]:
    """Send each request at its (compressed) time; latency and busy time in real seconds."""
    loop = asyncio.get_running_loop()
    tally, busy, client = Tally(), dict[str, float](), QueryClient(bus, view)
    start = loop.time()
    last_end = start

    async def one(r: Arrival) -> None:
        nonlocal last_end
        deadline = time.time() + 600 / speedup + 30
        cap = r.output_tokens if knowledge == "oracle" else r.max_tokens
        query = Query(
            request_id=uuid.uuid4().hex, text=query_text(r), max_tokens=cap, deadline=deadline
        )
        sent = loop.time()
        try:
            answer = await client.ask(query)
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
