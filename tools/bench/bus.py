"""`edgecollab bench bus`: Query → orchestrator → emulated worker → Answer, beside a bare
aiomqtt request/response ping-pong on the same broker in the same run. Prints JSON."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from schemas import Answer, Query
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.logging import configure_logging
from services.core.settings import MqttSettings
from services.core.topics import QUERIES
from tools.broker import free_port, start_mosquitto
from tools.common import print_json, spawn
from tools.stack import ServiceSpec

PING, NODELAY = "bench/ping", [(6, 1, 1)]  # IPPROTO_TCP, TCP_NODELAY


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bus", help="round trip and throughput of the stack vs bare MQTT")
    parser.add_argument("--requests", type=int, default=2000, help="per throughput run")
    parser.add_argument("--sequential", type=int, default=300, help="for the latency run")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


async def bench(args: argparse.Namespace) -> int:
    configure_logging("bench", level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        broker = start_mosquitto(port, Path(tmp))
        mqtt = MqttSettings(host="127.0.0.1", port=port)
        try:
            bare = await _measure_bare(mqtt, args)
            stack = await _measure_stack(mqtt, args)
        finally:
            broker.terminate()
    print_json(
        {
            "bare_aiomqtt": bare,
            "stack": stack,
            "ratio": {
                "p50": round(stack["p50_ms"] / bare["p50_ms"], 2),
                "throughput": round(stack["req_per_s"] / bare["req_per_s"], 2),
            },
        }
    )
    return 0


# -- bare ping-pong -------------------------------------------------------------------------


def echo_server(port: int) -> None:
    """A bare aiomqtt responder: echoes each request to its Response Topic."""

    async def serve() -> None:
        async with aiomqtt.Client(
            "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NODELAY
        ) as client:
            await client.subscribe(PING, qos=1)
            async for message in client.messages:
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = message.properties.CorrelationData
                await client.publish(
                    message.properties.ResponseTopic, message.payload, qos=1, properties=props
                )

    asyncio.run(serve())


async def _measure_bare(mqtt: MqttSettings, args: argparse.Namespace) -> dict[str, float]:
    code = f"from tools.bench.bus import echo_server; echo_server({mqtt.port})"
    server = spawn([sys.executable, "-c", code], mqtt)
    try:
        await asyncio.sleep(1.0)
        reply_topic = f"bench/reply/{uuid.uuid4().hex[:8]}"
        pending: dict[bytes, asyncio.Future[None]] = {}
        async with aiomqtt.Client(
            mqtt.host, mqtt.port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NODELAY
        ) as client:
            await client.subscribe(reply_topic, qos=1)
            reader = asyncio.create_task(_resolve_replies(client, pending))

            async def one() -> None:
                correlation = uuid.uuid4().bytes
                future = pending[correlation] = asyncio.get_running_loop().create_future()
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic, props.CorrelationData = reply_topic, correlation
                await client.publish(PING, b'{"v":1}', qos=1, properties=props)
                await asyncio.wait_for(future, 10)

            result = await _measure(one, args)
            reader.cancel()
        return result
    finally:
        server.terminate()


async def _resolve_replies(
    client: aiomqtt.Client, pending: dict[bytes, asyncio.Future[None]]
) -> None:
    async for message in client.messages:
        future = pending.pop(message.properties.CorrelationData, None)
        if future is not None and not future.done():
            future.set_result(None)


# -- the stack --------------------------------------------------------------------------------


async def _measure_stack(mqtt: MqttSettings, args: argparse.Namespace) -> dict[str, float]:
    tag = uuid.uuid4().hex[:6]
    specs = [
        ServiceSpec("orchestrator", "services.orchestrator", ("--agent-id", f"bench-orch-{tag}")),
        ServiceSpec(
            "worker",
            "services.worker",
            (
                "--agent-id",
                f"bench-worker-{tag}",
                "--tokens-per-s",
                "1000000",
                "--concurrency",
                "100000",
            ),
        ),
    ]
    procs = [spawn(spec.local_command(), mqtt) for spec in specs]
    try:
        bus = Bus(settings=mqtt, client_id=f"bench-client-{tag}", service="bench")
        view = CmsView(bus)
        runner = asyncio.create_task(bus.run())
        if not await view.wait_online([f"bench-orch-{tag}", f"bench-worker-{tag}"]):
            raise SystemExit("bench: the stack did not come online")
        lost = 0

        async def one() -> None:
            nonlocal lost
            query = Query(
                request_id=uuid.uuid4().hex, text="ping", max_tokens=1, deadline=time.time() + 10
            )
            answer = await bus.request(
                QUERIES.format(), query, replies=QUERIES.replies, deadline=query.deadline
            )
            if not isinstance(answer, Answer) or answer.outcome != "edge":
                lost += 1

        result = await _measure(one, args)
        result["lost"] = lost
        runner.cancel()
        return result
    finally:
        for proc in procs:
            proc.terminate()


# -- measuring ----------------------------------------------------------------------------------


async def _measure(one, args: argparse.Namespace) -> dict[str, float]:  # type: ignore[no-untyped-def]
    for _ in range(50):  # warm-up
        await one()
    latencies = []
    for _ in range(args.sequential):
        started = time.perf_counter()
        await one()
        latencies.append((time.perf_counter() - started) * 1000)
    semaphore = asyncio.Semaphore(args.in_flight)

    async def limited() -> None:
        async with semaphore:
            await one()

    started = time.perf_counter()
    results = await asyncio.gather(
        *(limited() for _ in range(args.requests)), return_exceptions=True
    )
    elapsed = time.perf_counter() - started
    failures = sum(isinstance(r, BaseException) for r in results)
    latencies.sort()
    return {
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 3),
        "req_per_s": round((args.requests - failures) / elapsed, 1),
        "requests": args.requests,
        "failed": failures,
        "in_flight": args.in_flight,
    }
