"""`edgecollab bench bus`: Query → orchestrator → emulated worker → Answer, beside bare
request/response ping-pongs on the same broker in the same run: aiomqtt on both ends, and
paho-mqtt on both ends (the bus runs on paho). The paho requester also drives the stack.
The HTTP arm sends the same queries as OpenAI chat completions through the gateway
(keep-alive HTTP/1.1 connections, one request at a time on each). Prints JSON.

The broker is secure as `edgecollab up` runs it (`--security auth`: accounts and ACLs over
plain MQTT on loopback); `--security tls`: the clients over TLS as from another box (the
services stay on loopback, as `up` and compose run them); `--security tls-all`: every
connection over TLS; `--security plain`: anonymous, no ACL, no TLS, as before security.
`--compare-security` runs the stack path only, on a fresh broker of each kind in turn,
`--rounds` times, and prints what security costs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.logging import configure_logging
from services.core.settings import MqttSettings
from services.core.topics import QUERIES, REPLIES
from tools.common import print_json, running, spawn, stop
from tools.common.broker import LocalBroker, free_port
from tools.common.stack import ServiceSpec

PING, NODELAY = "bench/ping", [(6, 1, 1)]  # IPPROTO_TCP, TCP_NODELAY
REPLY_TIMEOUT_S = 10.0  # a request unanswered this long counts as failed, and the run goes on
PROBE_EVERY_S = 0.5  # until a responder answers a first probe, one more probe this often
READY_TIMEOUT_S = 60.0
ARMS = ("aiomqtt", "paho", "stack", "gateway")
SECURITY = ("plain", "auth", "tls", "tls-all")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bus", help="round trip and throughput of the stack vs bare MQTT")
    parser.add_argument("--requests", type=int, default=5000, help="per throughput run")
    parser.add_argument("--sequential", type=int, default=300, help="for the latency run")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma-separated, of: {', '.join(ARMS)} (default: all)",
    )
    parser.add_argument(
        "--security",
        choices=SECURITY,
        default="auth",
        help="auth: accounts and ACLs (edgecollab up's broker); tls: and the clients over TLS;"
        " tls-all: every connection over TLS; plain: none of it",
    )
    parser.add_argument(
        "--compare-security",
        action="store_true",
        help="the stack path only, on each kind of broker in turn (--rounds times)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="for --compare-security")
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


async def bench(args: argparse.Namespace) -> int:
    arms = [a for a in args.arms.split(",") if a]
    if not arms or set(arms) - set(ARMS):
        raise SystemExit(f"bench bus: --arms takes some of {', '.join(ARMS)}")
    configure_logging("bench", level="warning")
    logging.getLogger("mqtt").setLevel(logging.ERROR)  # aiomqtt's note on each queued publish
    if args.compare_security:
        print_json(await _compare_security(args))
        return 0
    results: dict[str, Any] = {"security": args.security}
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp), secure=args.security != "plain")
        broker.start()
        tls = args.security.startswith("tls")
        try:
            if "aiomqtt" in arms:
                results["bare_aiomqtt"] = await _measure_bare(broker, tls, args)
            if "paho" in arms:
                results["bare_paho"] = await asyncio.to_thread(
                    _measure_bare_paho, broker, tls, args
                )
            if "stack" in arms:
                results["stack"] = await _measure_stack(broker, args.security, args)
            if "gateway" in arms:
                results["gateway"] = await _measure_gateway(broker, args.security, args)
        finally:
            broker.stop()
    for library in ("aiomqtt", "paho"):
        if "stack" in results and f"bare_{library}" in results:
            results[f"ratio_to_{library}"] = _ratio(results["stack"], results[f"bare_{library}"])
    if "stack" in results and "gateway" in results:
        results["ratio_gateway_to_stack"] = _ratio(results["gateway"], results["stack"])
    print_json(results)
    return 0


async def _compare_security(args: argparse.Namespace) -> dict[str, Any]:
    """The stack on a fresh broker of each kind in turn (in a shuffled order), `rounds` times;
    medians and their ratios to plain (rates move by a third between runs here: only turns in
    one run compare)."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in SECURITY}
    for number in range(args.rounds):
        for mode in random.Random(number).sample(SECURITY, len(SECURITY)):  # no fixed turn
            with tempfile.TemporaryDirectory() as tmp:
                broker = LocalBroker(Path(tmp), secure=mode != "plain")
                broker.start()
                try:
                    runs[mode].append(await _measure_stack(broker, mode, args))
                finally:
                    broker.stop()

    def median(mode: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[mode])

    summary = {
        mode: {"req_per_s": median(mode, "req_per_s"), "p50_ms": median(mode, "p50_ms")}
        for mode in SECURITY
    }
    plain = summary["plain"]
    return {
        "rounds": args.rounds,
        "median": summary,
        "vs_plain": {
            mode: {
                "throughput": round(summary[mode]["req_per_s"] / plain["req_per_s"], 3),
                "p50": round(summary[mode]["p50_ms"] / plain["p50_ms"], 3),
            }
            for mode in SECURITY[1:]
        },
        "runs": runs,
    }


def _ratio(stack: dict[str, Any], bare: dict[str, Any]) -> dict[str, float]:
    return {
        "p50": round(stack["p50_ms"] / bare["p50_ms"], 2),
        "throughput": round(stack["req_per_s"] / bare["req_per_s"], 2),
    }


# -- bare ping-pong -------------------------------------------------------------------------


def _start_echo_server(function: str, mqtt: MqttSettings) -> subprocess.Popen[bytes]:
    """One of the echo servers below in a process of its own (its account and TLS from the
    environment); the requester probes it until it answers, so the measurement starts once it
    has subscribed."""
    code = f"from tools.bench.bus import {function}; {function}()"
    return spawn([sys.executable, "-c", code], mqtt)


def _aiomqtt(mqtt: MqttSettings) -> aiomqtt.Client:
    return aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        username=mqtt.username,
        password=mqtt.secret(),
        identifier=mqtt.username,
        tls_context=mqtt.tls_context(),
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NODELAY,
    )


def echo_server() -> None:
    """A bare aiomqtt responder: echoes each request to its Response Topic."""

    async def serve() -> None:
        async with _aiomqtt(MqttSettings()) as client:
            await client.subscribe(PING, qos=1)
            async for message in client.messages:
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = message.properties.CorrelationData
                await client.publish(
                    message.properties.ResponseTopic, message.payload, qos=1, properties=props
                )

    asyncio.run(serve())


async def _measure_bare(broker: LocalBroker, tls: bool, args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    server = _start_echo_server("echo_server", broker.login(f"bench-echo-{tag}", "bench", tls=tls))
    broker_pid = _pid(broker)
    try:
        reply_topic = f"bench/reply/{uuid.uuid4().hex[:8]}"
        pending: dict[bytes, asyncio.Future[None]] = {}
        async with _aiomqtt(broker.login(f"bench-ping-{tag}", "bench", tls=tls)) as client:
            await client.subscribe(reply_topic, qos=1)  # returns on the SUBACK
            reader = asyncio.create_task(_resolve_replies(client, pending))

            async def send(future: asyncio.Future[None]) -> bytes:
                correlation = uuid.uuid4().bytes
                pending[correlation] = future
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic, props.CorrelationData = reply_topic, correlation
                await client.publish(PING, b'{"v":1}', qos=1, properties=props)
                return correlation

            async def one() -> None:
                future = asyncio.get_running_loop().create_future()
                correlation = await send(future)
                try:
                    await asyncio.wait_for(future, REPLY_TIMEOUT_S)
                finally:
                    pending.pop(correlation, None)

            await _until_answered(send, pending)
            meter = _CpuMeter(client=os.getpid(), server=server.pid, broker=broker_pid)
            result = await _measure(one, args, meter)
            reader.cancel()
        return result
    finally:
        stop(server)


async def _until_answered(
    send: Callable[[asyncio.Future[None]], Awaitable[bytes]],
    pending: dict[bytes, asyncio.Future[None]],
) -> None:
    """Probe until the echo server answers one probe: then it has subscribed."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[None] = loop.create_future()
    give_up, probes = loop.time() + READY_TIMEOUT_S, []
    try:
        while not answered.done():
            if loop.time() > give_up:
                raise SystemExit(f"bench: nothing answered on {PING} in {READY_TIMEOUT_S:.0f} s")
            probes.append(await send(answered))
            await asyncio.wait({answered}, timeout=PROBE_EVERY_S)
    finally:
        for correlation in probes:
            pending.pop(correlation, None)


async def _resolve_replies(
    client: aiomqtt.Client, pending: dict[bytes, asyncio.Future[None]]
) -> None:
    async for message in client.messages:
        future = pending.pop(message.properties.CorrelationData, None)
        if future is not None and not future.done():
            future.set_result(None)


# -- bare paho ping-pong ------------------------------------------------------------------------


def _paho_client(mqtt: MqttSettings, on_message: Callable[..., None]) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=mqtt.username or "",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if mqtt.username is not None:
        client.username_pw_set(mqtt.username, mqtt.secret())
    if mqtt.uses_tls:
        client.tls_set_context(mqtt.tls_context())
    client.max_inflight_messages_set(1000)
    client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(*NODELAY[0])
    client.on_message = on_message
    client.connect(mqtt.host, mqtt.port)
    return client


def paho_echo_server() -> None:
    """A bare paho responder: echoes each request to its Response Topic."""

    def echo(client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = message.properties.CorrelationData
        client.publish(message.properties.ResponseTopic, message.payload, qos=1, properties=props)

    client = _paho_client(MqttSettings(), echo)
    client.subscribe(PING, qos=1)
    client.loop_forever()


def _measure_bare_paho(broker: LocalBroker, tls: bool, args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    echo = broker.login(f"bench-echo-{tag}", "bench", tls=tls)
    pinger = broker.login(f"bench-ping-{tag}", "bench", tls=tls)
    server = _start_echo_server("paho_echo_server", echo)
    try:
        meter = _CpuMeter(client=os.getpid(), server=server.pid, broker=_pid(broker))
        reply_topic = f"bench/reply/{uuid.uuid4().hex[:8]}"
        return _PahoPinger(pinger, args, meter, PING, lambda: b'{"v":1}', reply_topic).run()
    finally:
        stop(server)


def _pid(broker: LocalBroker) -> int:
    assert broker.proc is not None
    return broker.proc.pid


class _PahoPinger:
    """A bare paho requester on one thread: each reply's callback sends the next request.

    It starts once its reply topic is subscribed and a first probe came back (the responder
    has subscribed too). Phases as in `_measure`: 50 warm-up and `sequential` requests one at
    a time (latency), then `requests` with `in_flight` outstanding (throughput). A reply that
    `accept` refuses counts as lost; a request unanswered for REPLY_TIMEOUT_S counts as failed
    and the next one goes out."""

    def __init__(
        self,
        mqtt: MqttSettings,
        args: argparse.Namespace,
        meter: _CpuMeter,
        topic: str,
        payload: Callable[[], bytes],
        reply_topic: str,
        accept: Callable[[bytes], bool] = lambda _reply: True,
    ) -> None:
        self.args, self.meter = args, meter
        self.topic, self.payload, self.accept = topic, payload, accept
        self.reply_topic = reply_topic
        self.sent_at: dict[bytes, float] = {}
        self.probes: set[bytes] = set()
        self.latencies: list[float] = []
        self.one_at_a_time = 50 + args.sequential
        self.total = self.one_at_a_time + args.requests
        self.sent = self.answered = self.lost = self.expired = 0
        self.subscribed = self.echoed = False
        self.started = time.perf_counter()
        self.client = _paho_client(mqtt, self._on_reply)
        self.client.on_subscribe = lambda *_: setattr(self, "subscribed", True)
        self.client.subscribe(self.reply_topic, qos=1)

    def run(self) -> dict[str, Any]:
        self._loop_until(lambda: self.subscribed, READY_TIMEOUT_S, "no SUBACK for the replies")
        give_up = time.monotonic() + READY_TIMEOUT_S
        while not self.echoed:
            if time.monotonic() > give_up:
                raise SystemExit(f"bench: nothing answered on {self.topic}")
            self._send(probe=True)
            self._loop_until(lambda: self.echoed, PROBE_EVERY_S)
        self._send()
        while self.answered + self.expired < self.total:
            if self.client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS:
                break  # the connection is gone: what is unanswered counts as failed
            self._expire()
        elapsed = time.perf_counter() - self.started
        self.client.disconnect()
        failed = self.total - self.answered
        return _summary(self.latencies, self.args, elapsed, failed, self.meter) | {
            "lost": self.lost
        }

    def _loop_until(self, done: Callable[[], bool], timeout: float, fail: str = "") -> None:
        """Run paho's loop until `done()`; past `timeout`, exit with `fail` or just return."""
        until = time.monotonic() + timeout
        while not done():
            if time.monotonic() > until:
                if fail:
                    raise SystemExit(f"bench: {fail} in {timeout:.0f} s")
                return
            self.client.loop(timeout=0.05)

    def _send(self, *, probe: bool = False) -> None:
        correlation = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = self.reply_topic, correlation
        if probe:
            self.probes.add(correlation)
        else:
            self.sent_at[correlation] = time.perf_counter()
            self.sent += 1
        self.client.publish(self.topic, self.payload(), qos=1, properties=props)

    def _expire(self) -> None:
        """Give up on requests unanswered for REPLY_TIMEOUT_S: failed, and the run goes on."""
        now = time.perf_counter()
        for correlation, sent in list(self.sent_at.items()):
            if now - sent > REPLY_TIMEOUT_S:
                del self.sent_at[correlation]
                self.expired += 1
                self._next()

    def _on_reply(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        correlation = message.properties.CorrelationData
        if correlation in self.probes:
            self.echoed = True
            return
        sent = self.sent_at.pop(correlation, None)
        if sent is None:  # given up on already
            return
        self.answered += 1
        self.lost += not self.accept(message.payload)
        if 50 < self.answered + self.expired <= self.one_at_a_time:
            self.latencies.append((time.perf_counter() - sent) * 1000)
        self._next()

    def _next(self) -> None:
        """One request is done (answered or given up on): send what comes next."""
        if self.answered + self.expired == self.one_at_a_time:  # latency done: fill the window
            self.started = time.perf_counter()
            self.meter.start()
            for _ in range(min(self.args.in_flight, self.total - self.sent)):
                self._send()
        elif self.sent < self.total:
            self._send()


# -- the stack --------------------------------------------------------------------------------


async def _measure_stack(
    broker: LocalBroker, security: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The bare paho requester again, now sending Queries to the orchestrator: both paths
    share one load generator, so the difference is the stack's."""
    tls = security.startswith("tls")  # the clients: the requester and the one that waits
    tag = uuid.uuid4().hex[:6]
    orchestrator, worker = f"bench-orch-{tag}", f"bench-worker-{tag}"
    specs = [
        ServiceSpec("orchestrator", "services.orchestrator", ("--agent-id", orchestrator)),
        ServiceSpec(
            "worker",
            "services.worker",
            ("--agent-id", worker, "--tokens-per-s", "1000000", "--concurrency", "100000"),
        ),
    ]
    procs = _spawn_all(specs, broker, security)
    try:
        await _wait_online(
            broker.login(f"bench-client-{tag}", "bench", tls=tls), [orchestrator, worker]
        )
        meter = _CpuMeter(
            client=os.getpid(), orchestrator=procs[0].pid, worker=procs[1].pid, broker=_pid(broker)
        )
        requester = f"bench-ask-{tag}"  # a client: its answers come to replies/<itself>
        pinger = _PahoPinger(
            broker.login(requester, "bench", tls=tls),
            args,
            meter,
            QUERIES.format(),
            _query,
            REPLIES.format(client=requester),
            _answered_on_edge,
        )
        return await asyncio.to_thread(pinger.run)
    finally:
        stop(*procs)


async def _measure_gateway(
    broker: LocalBroker, security: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The same queries as chat completions through the gateway's HTTP API (the gateway on
    the bus as the stack's services are: over TLS only with `tls-all`)."""
    tag = uuid.uuid4().hex[:6]
    orchestrator, worker, gateway = (f"bench-{n}-{tag}" for n in ("orch", "worker", "gw"))
    key, http_port = f"bench-{uuid.uuid4().hex}", free_port()
    specs = [
        ServiceSpec("orchestrator", "services.orchestrator", ("--agent-id", orchestrator)),
        ServiceSpec(
            "worker",
            "services.worker",
            ("--agent-id", worker, "--tokens-per-s", "1000000", "--concurrency", "100000"),
        ),
        ServiceSpec(
            "gateway",
            "services.gateway",
            ("--agent-id", gateway, "--port", str(http_port),
             "--api-keys", orjson.dumps({key: "bench"}).decode()),
        ),
    ]  # fmt: skip
    procs = _spawn_all(specs, broker, security)
    try:
        watcher = broker.login(f"bench-client-{tag}", "bench", tls=security.startswith("tls"))
        await _wait_online(watcher, [orchestrator, worker, gateway])
        await _wait_gateway_ready(http_port)
        meter = _CpuMeter(
            client=os.getpid(),
            orchestrator=procs[0].pid,
            worker=procs[1].pid,
            gateway=procs[2].pid,
            broker=_pid(broker),
        )
        return await _HttpLoad(http_port, key, args, meter).run()
    finally:
        stop(*procs)


async def _wait_gateway_ready(port: int, timeout: float = 60.0) -> None:
    """Until the gateway's own CMS view has the orchestrator and the worker online."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = await _HttpConnection.open(port)
            status, body = await connection.call(b"GET", b"/health")
            connection.close()
            online = orjson.loads(body).get("online", {}) if status == 200 else {}
            if online.get("orchestrator") and online.get("worker"):
                return
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("bench: the gateway did not become ready")


class _HttpConnection:
    """One keep-alive HTTP/1.1 connection of the load generator: as little client cost as
    the bare paho requester has, so the measured difference is the gateway's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _HttpConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(*NODELAY[0])
        return cls(reader, writer)

    async def call(
        self, method: bytes, path: bytes, body: bytes = b"", headers: bytes = b""
    ) -> tuple[int, bytes]:
        self.writer.write(
            b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Length: %d\r\n\r\n%s"
            % (method, path, headers, len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(head[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class _HttpLoad:
    """Phases as the MQTT paths': warm-up, one at a time (latency), then `in_flight`
    connections each sending its next request as soon as its answer is in (throughput)."""

    def __init__(self, port: int, key: str, args: argparse.Namespace, meter: _CpuMeter) -> None:
        self.port, self.args, self.meter = port, args, meter
        self.headers = b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n" % (
            key.encode()
        )
        self.body = orjson.dumps(
            {"model": "edgecollab", "messages": [{"role": "user", "content": "ping"}],
             "max_tokens": 1}
        )  # fmt: skip
        self.lost = 0

    async def one(self, connection: _HttpConnection) -> None:
        status, body = await connection.call(
            b"POST", b"/v1/chat/completions", self.body, self.headers
        )
        if status != 200 or b'"outcome":"edge"' not in body:
            self.lost += 1

    async def run(self) -> dict[str, Any]:
        first = await _HttpConnection.open(self.port)
        for _ in range(50):
            await self.one(first)
        latencies = []
        for _ in range(self.args.sequential):
            started = time.perf_counter()
            await self.one(first)
            latencies.append((time.perf_counter() - started) * 1000)
        connections = [first] + [
            await _HttpConnection.open(self.port) for _ in range(self.args.in_flight - 1)
        ]
        remaining = self.args.requests

        async def drive(connection: _HttpConnection) -> int:
            nonlocal remaining
            failures = 0
            while remaining > 0:
                remaining -= 1
                try:
                    await asyncio.wait_for(self.one(connection), 10)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                    failures += 1
                    break
            return failures

        started = time.perf_counter()
        self.meter.start()
        failed = sum(await asyncio.gather(*(drive(c) for c in connections)))
        elapsed = time.perf_counter() - started
        for connection in connections:
            connection.close()
        return _summary(latencies, self.args, elapsed, failed, self.meter) | {"lost": self.lost}


def _spawn_all(
    specs: list[ServiceSpec], broker: LocalBroker, security: str
) -> list[subprocess.Popen[bytes]]:
    """Each service of `specs` on `broker`, with its own account (over TLS for tls-all)."""
    return [
        spawn(
            spec.local_command(),
            broker.login(spec.agent, spec.role, tls=security == "tls-all"),
            state_dir=broker.workdir,
        )
        for spec in specs
    ]


async def _wait_online(mqtt: MqttSettings, agents: list[str]) -> None:
    bus = Bus(
        settings=mqtt, client_id=mqtt.username or f"bench-{uuid.uuid4().hex[:6]}", service="bench"
    )
    view = CmsView(bus)
    async with running(bus):
        if not await view.wait_online(agents):
            raise SystemExit("bench: the stack did not come online")


def _query() -> bytes:
    query = {"v": 1, "type": "query", "request_id": uuid.uuid4().hex, "text": "ping"}
    return orjson.dumps(query | {"max_tokens": 1, "deadline": time.time() + 10})


def _answered_on_edge(payload: bytes) -> bool:
    reply = orjson.loads(payload)
    return reply.get("type") == "answer" and reply.get("outcome") == "edge"


# -- measuring ----------------------------------------------------------------------------------


async def _measure(one, args: argparse.Namespace, meter: _CpuMeter) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """`one()` raises TimeoutError for a request left unanswered: it counts as failed."""
    unanswered = 0

    async def answered() -> bool:
        nonlocal unanswered
        try:
            await one()
        except TimeoutError:
            unanswered += 1
            return False
        return True

    for _ in range(50):  # warm-up
        await answered()
    latencies = []
    for _ in range(args.sequential):
        started = time.perf_counter()
        if await answered():
            latencies.append((time.perf_counter() - started) * 1000)
    semaphore = asyncio.Semaphore(args.in_flight)

    async def limited() -> None:
        async with semaphore:
            await one()

    started = time.perf_counter()
    meter.start()
    results = await asyncio.gather(
        *(limited() for _ in range(args.requests)), return_exceptions=True
    )
    elapsed = time.perf_counter() - started
    failures = unanswered + sum(isinstance(r, BaseException) for r in results)
    return _summary(latencies, args, elapsed, failures, meter)


class _CpuMeter:
    """CPU time of named processes over the throughput phase, per request (the machine's
    cores are shared, so the sum is what bounds the rate)."""

    def __init__(self, **pids: int) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start()

    def start(self) -> None:
        self.before = self._seconds()

    def per_request(self, requests: int) -> dict[str, float]:
        spent = {n: s - self.before[n] for n, s in self._seconds().items()}
        spent["total"] = sum(spent.values())
        return {name: round(s * 1000 / max(requests, 1), 3) for name, s in spent.items()}

    def _seconds(self) -> dict[str, float]:
        return {n: sum(p.cpu_times()[:2]) for n, p in self.processes.items()}


def _summary(
    latencies: list[float],
    args: argparse.Namespace,
    elapsed: float,
    failures: int,
    meter: _CpuMeter,
) -> dict[str, Any]:
    cpu = meter.per_request(args.requests - failures)  # first: the phase has just ended
    latencies.sort()
    return {
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 3),
        "req_per_s": round((args.requests - failures) / elapsed, 1),
        "requests": args.requests,
        "failed": failures,
        "in_flight": args.in_flight,
        "cpu_ms_per_request": cpu,
    }
