"""`edgecollab bench faults`: a bounded load through the real stack while a fault is injected.

Per fault a fresh stack (its own mosquitto, orchestrators, two emulated workers, either able to
carry the load alone) takes `--queries` queries at `--rate` per second, asked by the
QueryClient as `edgecollab ask` does; a few seconds in, the fault strikes. Each query ends as
exactly one of: answered at the edge, answered by the cloud (none configured here, so 0),
failed or refused with an error, or never answered (no reply of any kind before its
deadline). Printed per fault: those counts, how many answers needed a re-dispatch or a
resend, the time until the fault was seen in the CMS, and the time until queries sent after
the fault were answered again. With `--stream` the answers are streamed, and each stream is
checked as a client sees it: chunks sent twice under one sequence number (a restart a naive
client would show), and whether the text shown (services.core.transcript) is the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from schemas import Answer, Outcome, Query, TokenChunk
from services.core.bus import Bus, Request
from services.core.client import QueryClient
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, EdgecollabError
from services.core.logging import configure_logging
from services.core.settings import MqttSettings
from services.core.topics import STREAM, TASKS
from services.core.transcript import Transcript
from tools.common import print_json, running, spawn, stop
from tools.common.broker import LocalBroker

FAULTS = (
    "worker_kill",
    "worker_freeze",
    "orchestrator_kill",
    "orchestrator_kill_standby",
    "broker_restart",
    "slow_subscriber",
)
STRIKE_AFTER_S = 3.0  # the fault comes this long after the first query
FREEZE_S = 20.0
ORCHESTRATOR_RESTART_S = 5.0
BROKER_DOWN_S = 2.0
KEEPALIVE_S = 5  # the services' MQTT keepalive: a frozen worker is seen after ~1.5x


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("faults", help="faults injected under load; what got answered")
    parser.add_argument("--fault", action="append", choices=FAULTS, help="repeatable; default all")
    parser.add_argument("--queries", type=int, default=200, help="queries per fault (200)")
    parser.add_argument("--rate", type=float, default=10.0, help="queries per second (10)")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds per query (60)")
    parser.add_argument("--tokens", type=int, default=20, help="output tokens per query (20)")
    parser.add_argument("--stream", action="store_true", help="stream the answers and check them")
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


async def bench(args: argparse.Namespace) -> int:
    configure_logging("bench", level="warning")
    if args.queries < 1 or args.rate <= 0 or args.deadline <= 0:
        raise SystemExit("bench faults: --queries, --rate and --deadline must be positive")
    report = {"queries": args.queries, "rate": args.rate, "keepalive_s": KEEPALIVE_S, "faults": {}}
    for fault in args.fault or FAULTS:
        print(f"faults: {fault} ...", file=sys.stderr, flush=True)
        report["faults"][fault] = await _one(fault, args)  # type: ignore[index]
    print_json(report)
    return 0


@dataclass
class _Stack:
    """The processes of one run and how to start each again."""

    broker: LocalBroker  # secure, as `edgecollab up` runs it
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    reader: subprocess.Popen[bytes] | None = None  # a `#` subscriber that stops reading

    def login(self, name: str, role: str = "client") -> MqttSettings:
        """Account `name`, with the bench's keepalive (the services' too)."""
        return self.broker.login(name, role).model_copy(update={"keepalive": KEEPALIVE_S})

    def start(self, name: str, *argv: str) -> None:
        role = argv[0].removeprefix("services.")
        mqtt = self.login(name, role)
        self.procs[name] = spawn([sys.executable, "-m", *argv], mqtt, state_dir=self.broker.workdir)

    def orchestrator(self, name: str) -> None:
        self.start(name, "services.orchestrator", "--agent-id", name)

    def worker(self, name: str) -> None:
        self.start(name, "services.worker", "--agent-id", name, "--tokens-per-s", "100",
                   "--concurrency", "8")  # fmt: skip


async def _one(fault: str, args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp))
        broker.start()
        stack = _Stack(broker)
        stack.orchestrator("orch-1")
        if fault == "orchestrator_kill_standby":
            stack.orchestrator("orch-2")
        for name in ("worker-1", "worker-2"):
            stack.worker(name)
        if fault == "slow_subscriber":
            observer = {"XDG_CONFIG_HOME": str(broker.credentials.root / "observer")}
            stack.reader = subprocess.Popen(  # the observer account, as README says to debug
                ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-t", "#",
                 "-q", "1", "-V", "mqttv5"], stdout=subprocess.DEVNULL,
                env={**os.environ, **observer},
            )  # fmt: skip
        try:
            return await _drive(fault, stack, args)
        finally:
            stop(*stack.procs.values(), *([stack.reader] if stack.reader else []))
            stack.broker.stop()


async def _drive(fault: str, stack: _Stack, args: argparse.Namespace) -> dict[str, object]:
    client_id = f"faults-{uuid.uuid4().hex[:6]}"
    bus = Bus(settings=stack.login(client_id), client_id=client_id, service="bench")
    view = CmsView(bus)
    client = QueryClient(bus, view)
    results: list[tuple[float, str, Answer | None]] = []  # (sent at, how it ended, answer)
    heard: dict[str, list[TokenChunk]] = {}
    shown: dict[str, Transcript] = {}  # what `edgecollab ask` would show of each stream

    def on_chunk(request: Request[TokenChunk]) -> None:
        heard.setdefault(request.body.request_id, []).append(request.body)
        shown.setdefault(request.body.request_id, Transcript()).add(request.body)

    if args.stream:
        bus.listen(STREAM, on_chunk)
    async with running(bus):
        if not await view.wait_online(stack.procs, timeout=60):
            raise SystemExit(f"bench faults: the stack did not come online for {fault}")
        keys_before = len(list(view.items()))
        start = time.monotonic()
        strike = asyncio.create_task(_strike(fault, stack, view, start))
        tasks = []
        for n in range(args.queries):
            await asyncio.sleep(max(0.0, start + n / args.rate - time.monotonic()))
            tasks.append(asyncio.create_task(_ask(client, n, args, results, shown)))
        await asyncio.gather(*tasks)
        detected_s = await strike
        await view.synced()
        keys_after = len(list(view.items()))
    summary = _summary(results, start, detected_s, client.retries, keys_before, keys_after)
    return summary | ({"streams": _streams(results, heard, shown)} if args.stream else {})


async def _ask(
    client: QueryClient,
    n: int,
    args: argparse.Namespace,
    results: list[tuple[float, str, Answer | None]],
    shown: dict[str, Transcript],
) -> None:
    sent = time.monotonic()
    query = Query(
        request_id=f"f{n}-{uuid.uuid4().hex[:6]}", text=f"question {n}",
        max_tokens=args.tokens, deadline=time.time() + args.deadline, stream=args.stream,
    )  # fmt: skip
    transcript = shown.setdefault(query.request_id, Transcript()) if args.stream else None
    try:
        answer = await client.ask(query, transcript)
    except DeadlineExceeded:
        results.append((sent, "never_answered", None))
        return
    except EdgecollabError:
        results.append((sent, "failed_with_error", None))
        return
    ended = {Outcome.EDGE: "answered_edge", Outcome.CLOUD: "answered_cloud"}
    ended[Outcome.REJECTED_TO_CLOUD] = "answered_cloud"
    results.append((sent, ended.get(answer.outcome, "failed_with_error"), answer))


async def _strike(fault: str, stack: _Stack, view: CmsView, start: float) -> float | None:
    """Inject `fault`; returns seconds until the CMS showed it (None when nothing shows)."""
    await asyncio.sleep(max(0.0, start + STRIKE_AFTER_S - time.monotonic()))
    struck = time.monotonic()
    actions: dict[str, Callable[[], Awaitable[float | None]]] = {
        "worker_kill": lambda: _kill(stack, view, "worker-1", signal.SIGKILL, struck),
        "worker_freeze": lambda: _freeze(stack, view, struck),
        "orchestrator_kill": lambda: _kill_orchestrator(stack, view, struck, restart=True),
        "orchestrator_kill_standby": lambda: _kill_orchestrator(stack, view, struck),
        "broker_restart": lambda: _restart_broker(stack),
        "slow_subscriber": lambda: _stall_reader(stack, struck),
    }
    return await actions[fault]()


async def _kill(
    stack: _Stack, view: CmsView, name: str, sig: signal.Signals, struck: float
) -> float | None:
    os.kill(stack.procs[name].pid, sig)
    offline = await view.changes.until(lambda: not view.online(name), timeout=60)
    return round(time.monotonic() - struck, 3) if offline else None


async def _freeze(stack: _Stack, view: CmsView, struck: float) -> float | None:
    detected = await _kill(stack, view, "worker-1", signal.SIGSTOP, struck)
    await asyncio.sleep(max(0.0, struck + FREEZE_S - time.monotonic()))
    os.kill(stack.procs["worker-1"].pid, signal.SIGCONT)
    return detected


async def _kill_orchestrator(
    stack: _Stack, view: CmsView, struck: float, *, restart: bool = False
) -> float | None:
    detected = await _kill(stack, view, "orch-1", signal.SIGKILL, struck)
    if restart:
        await asyncio.sleep(max(0.0, struck + ORCHESTRATOR_RESTART_S - time.monotonic()))
        stack.orchestrator("orch-1")
    return detected


async def _stall_reader(stack: _Stack, struck: float) -> None:
    """A debugging `mosquitto_sub -t '#'` stops reading for FREEZE_S: the broker queues for it
    (to its limits) while everyone else is served."""
    assert stack.reader is not None
    os.kill(stack.reader.pid, signal.SIGSTOP)
    await asyncio.sleep(max(0.0, struck + FREEZE_S - time.monotonic()))
    os.kill(stack.reader.pid, signal.SIGCONT)


async def _restart_broker(stack: _Stack) -> None:
    await asyncio.to_thread(stack.broker.stop)
    await asyncio.sleep(BROKER_DOWN_S)
    await asyncio.to_thread(stack.broker.start)  # the same ports, accounts and store


def _streams(
    results: list[tuple[float, str, Answer | None]],
    heard: dict[str, list[TokenChunk]],
    shown: dict[str, Transcript],
) -> dict[str, int]:
    """Per streamed answer: was it continued by another worker, was a sequence number sent
    twice, and is what a client following the stream shows the answer's text."""
    resumed = republished = shown_whole = 0
    for _, _, answer in results:
        if answer is None:
            continue
        chunks = heard.get(answer.request_id, [])
        seqs = [c.seq for c in chunks]
        republished += len(seqs) - len(set(seqs))
        resumed += any("continued after" in (s.detail or "") for s in answer.steps)
        transcript = shown.get(answer.request_id, Transcript())
        whole = transcript.text + transcript.rest(answer.text)
        shown_whole += whole.split() == answer.text.split()
    answered = sum(a is not None for _, _, a in results)
    return {
        "answered": answered,
        "resumed": resumed,
        "chunks_republished": republished,
        "shown_equals_answer": shown_whole,
    }


def _summary(
    results: list[tuple[float, str, Answer | None]],
    start: float,
    detected_s: float | None,
    resent: int,
    keys_before: int,
    keys_after: int,
) -> dict[str, object]:
    counts = {k: 0 for k in ("answered_edge", "answered_cloud", "failed_with_error",
                             "never_answered")}  # fmt: skip
    for _, ended, _ in results:
        counts[ended] += 1
    redispatched = sum(
        1 for _, _, a in results
        if a is not None and sum(TASKS.match(s.topic) is not None for s in a.steps) > 1
    )  # fmt: skip
    after = sorted((sent, ended) for sent, ended, _ in results if sent >= start + STRIKE_AFTER_S)
    unserved = [sent for sent, ended in after if ended != "answered_edge"]
    recover = (max(unserved) - (start + STRIKE_AFTER_S)) if unserved else 0.0
    return {
        "sent": len(results),
        **counts,
        "redispatched": redispatched,
        "resent_by_client": resent,
        "time_to_detect_s": detected_s,
        "time_to_recover_s": round(recover, 3),
        "cms_keys_before": keys_before,
        "cms_keys_after": keys_after,
    }
