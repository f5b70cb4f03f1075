"""`edgecollab bench data`: Data cooperation measured. Sensors publish readings and window
embeddings on a broker this bench starts; a DataView asks for every stream's window embedding
once per window and reuses the published ones (the sensors started with `--window-s 0`
publish none, so those are computed). Prints JSON: reused vs computed, bytes of embeddings vs
the raw readings they stand for, readings/s taken, the consumer's CPU, and stats-v1's cost."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
import uuid
from pathlib import Path

from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.logging import configure_logging
from services.data.features import Sample, embed
from services.data.streams import PROFILES, STREAMS
from services.data.view import DataCounters, DataView
from tools.common import print_json, running, spawn, stop
from tools.common.broker import LocalBroker


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="embedding reuse and bytes saved by Data cooperation")
    parser.add_argument("--sensors", type=int, default=4, help="sensors publishing embeddings")
    parser.add_argument("--raw-only", type=int, default=1, help="sensors publishing none")
    parser.add_argument("--rate-hz", type=float, default=10.0)
    parser.add_argument("--window-s", type=float, default=3.0, help="rate x window = readings")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured period")
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


async def bench(args: argparse.Namespace) -> int:
    configure_logging("bench", level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp))
        broker.start()
        try:
            result = await _measure(broker, args)
        finally:
            broker.stop()
    result["stats_v1_us_per_window"] = _embed_cost(round(args.rate_hz * args.window_s))
    print_json(result)
    return 0


def _sensor_commands(args: argparse.Namespace, tag: str) -> dict[str, list[str]]:
    """Agent id → command line: alternating wearables and city sensors, then raw-only ones."""
    commands = {}
    for i in range(args.sensors + args.raw_only):
        profile = ("wearable", "city")[i % 2]
        window = args.window_s if i < args.sensors else 0
        agent = f"bench-{profile}-{i}-{tag}"
        commands[agent] = [
            *(sys.executable, "-m", "services.sensor", "--agent-id", agent, "--profile", profile),
            *("--rate-hz", str(args.rate_hz), "--window-s", str(window)),
        ]
    return commands


async def _measure(broker: LocalBroker, args: argparse.Namespace) -> dict[str, object]:
    tag = uuid.uuid4().hex[:6]
    commands = _sensor_commands(args, tag)
    procs = [
        spawn(argv, broker.login(agent, "sensor"), state_dir=broker.workdir)
        for agent, argv in commands.items()
    ]
    consumer = f"bench-consumer-{tag}"  # reads data/#, as an orchestrator does
    bus = Bus(settings=broker.login(consumer, "bench"), client_id=consumer, service="bench")
    view, cms = DataView(bus, window_s=args.window_s), CmsView(bus)
    try:
        async with running(bus):
            if not await cms.wait_online(list(commands), timeout=30):
                raise SystemExit("bench data: the sensors did not come online within 30 s")
            await asyncio.sleep(args.window_s + 0.5)  # every stream has had a first window
            before, cpu0, t0 = dataclasses.replace(view.counters), time.process_time(), time.time()
            asks = await _ask_every_window(view, args)
            elapsed, cpu = time.time() - t0, time.process_time() - cpu0
            return _report(args, before, view.counters, asks, elapsed, cpu)
    finally:
        stop(*procs)


async def _ask_every_window(view: DataView, args: argparse.Namespace) -> int:
    """Ask for every (agent, stream) window embedding once per window; how many were asked."""
    asked, deadline = 0, time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(args.window_s)
        for domain, names in PROFILES.values():
            for agent in view.agents(domain):
                for name in names:
                    asked += view.embedding(agent, name) is not None
    return asked


def _report(
    args: argparse.Namespace,
    before: DataCounters,
    after: DataCounters,
    asks: int,
    elapsed: float,
    cpu: float,
) -> dict[str, object]:
    d = {k: v - getattr(before, k) for k, v in dataclasses.asdict(after).items()}
    raw, emb = d["bytes_raw_equivalent"], d["bytes_received_embeddings"]
    return {
        "sensors": {"with_embeddings": args.sensors, "raw_only": args.raw_only},
        "rate_hz": args.rate_hz,
        "window_s": args.window_s,
        "seconds": round(elapsed, 2),
        "readings": d["readings"],
        "readings_per_s": round(d["readings"] / elapsed, 1),
        "refused": d["refused"],
        "embeddings_published_taken": d["embeddings"],
        "embedding_requests": asks,
        "embeddings_reused": d["embeddings_reused"],
        "embeddings_computed": d["embeddings_computed"],
        "reuse_rate": round(d["embeddings_reused"] / asks, 3) if asks else None,
        "bytes_received_embeddings": emb,
        "bytes_raw_equivalent": raw,
        "bytes_saved": raw - emb,
        "raw_over_embedding_bytes": round(raw / emb, 1) if emb else None,
        "consumer_cpu_percent": round(100 * cpu / elapsed, 1),
    }


def _embed_cost(n: int, repeats: int = 2000) -> float:
    """Microseconds for one stats-v1 embedding of an n-reading heart-rate window."""
    stream = STREAMS[("health", "heart_rate")]
    window = [Sample(float(i), 60.0 + (i % 7)) for i in range(max(1, n))]
    started = time.perf_counter()
    for _ in range(repeats):
        embed(stream, window)
    return round((time.perf_counter() - started) / repeats * 1e6, 1)
