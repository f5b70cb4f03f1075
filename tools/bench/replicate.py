"""`edgecollab bench replicate`: the CMS replicator across three sites on loopback.

Three mosquitto processes (with persistence, as on an edge box) and three replicator processes
in a full mesh. The bench writes through a plain client at each site, watches every site's
`cms/`, and counts what crosses the links by listening on each broker to what peers publish
there (`replication/from/<site>/changes`: live records; `replies/peer-<site>`: the answers to a
peer's pulls, i.e. repaired records). Phases:

1. spread: N shared entries written at random sites; time until every site has each one
   (p50/p99), records and messages per update.
2. partition: site c stopped (replicator and broker); M of the entries changed and some deleted
   at a and b; c restarted: time until c holds what a and b hold, and records repaired.
3. conflicts: K keys written at a and b at once under the same version: the same value at
   every site, and the one the merge rule predicts.
4. deletes: D keys deleted at random sites: time until gone everywhere; none comes back.

`--bridge-probe` also measures why mosquitto bridges do not carry `cms/` themselves.
Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from services.core import cms
from services.core.bus import Bus
from services.core.logging import configure_logging
from tools.common import print_json, spawn, stop
from tools.common.broker import LocalBroker, broker_answers, free_port, local_config
from tools.common.security import peer_account

SITES = ("a", "b", "c")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("replicate", help="the CMS replicator across three local sites")
    parser.add_argument("--entries", type=int, default=1000, help="entries spread")
    parser.add_argument("--rate", type=float, default=500.0, help="writes/s (0: all at once)")
    parser.add_argument("--changed", type=int, default=900, help="changed while c is away")
    parser.add_argument("--deleted", type=int, default=100, help="deleted while c is away")
    parser.add_argument("--conflicts", type=int, default=200, help="keys written at a and b")
    parser.add_argument("--deletes", type=int, default=200, help="keys deleted at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quiet-s", type=float, default=1.0, help="wait after each phase: nothing more comes"
    )
    parser.add_argument("--bridge-probe", action="store_true", help="also measure bridges")
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


@dataclass
class Traffic:
    """What peers published on one broker, by kind."""

    live_records: int = 0
    live_messages: int = 0
    repair_records: int = 0  # answers to a peer's wants (records leaving this site)
    repair_messages: int = 0
    digests: int = 0  # answers to a peer's digests
    versions: int = 0  # [key, version, ...] listed in those answers
    bytes: int = 0
    per_key: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    repaired_keys: list[str] = field(default_factory=list)

    def on(self, topic: str, payload: bytes) -> None:
        self.bytes += len(payload)
        body = orjson.loads(payload) if payload else {}
        kind = body.get("type")
        if topic.startswith("replication/from/") and kind == "replica_changes":
            self.live_messages += 1
            self.live_records += len(body["records"])
            for record in body["records"]:
                self.per_key[record["key"]] += 1
        elif kind == "replica_changes":
            self.repair_messages += 1
            self.repair_records += len(body["records"])
            self.repaired_keys += [record["key"] for record in body["records"]]
        elif kind == "replica_versions":
            self.digests += 1
            self.versions += len(body["versions"])

    def snapshot(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


class Site:
    """One site of the bench: its broker (secure, with accounts and a CA of its own), its
    replicator process (logged in to each peer's broker as peer-<site>, over TLS), an observer
    watching `cms/` and the links' traffic, and an operator writing through."""

    def __init__(self, name: str, root: Path, tag: str) -> None:
        self.name, self.tag = name, tag
        self.local = LocalBroker(root / name)
        self.port, self.workdir = self.local.port, self.local.workdir
        self.local.credentials.add([peer_account(name)])  # its secret: imported by the peers
        self.peer_cas = root / "peer-cas.crt"  # every site's CA, one file (bench writes it)
        self.broker: LocalBroker | None = None
        self.replicator: subprocess.Popen[bytes] | None = None
        self.state: dict[str, dict[str, Any]] = {}
        self.arrived: dict[str, float] = {}  # topic → when its current value arrived
        self.traffic = Traffic()
        self.bus = self._new_bus()
        self._task: asyncio.Task[None] | None = None

    def peer_of(self, other: Site) -> None:
        """Let `other`'s replicator in: its account, with the secret `other` made for it."""
        account = peer_account(other.name)
        secret = other.local.credentials.secret_file(account.name).read_text().strip()
        self.local.credentials.add([account], secrets={account.name: secret})

    def _new_bus(self) -> Bus:
        watcher = f"bench-{self.name}-{self.tag}"
        bus = Bus(settings=self.local.login(watcher, "observer"), client_id=watcher, service="b")
        writer = f"operator-{self.name}-{self.tag}"  # the bench writes configs/ and tenants/
        self.writer = Bus(
            settings=self.local.login(writer, "operator"), client_id=writer, service="bench"
        )
        bus.listen_raw("cms/#", self._on_cms)
        bus.listen_raw("replication/from/+/changes", self.traffic.on)
        bus.listen_raw("replies/+", self._on_reply)
        return bus

    async def connect(self) -> None:
        """Watch (and write through) a fresh client: a snapshot cannot show what was deleted
        while a client was away, so its state starts empty."""
        await self.disconnect()
        self.state.clear()
        self.bus = self._new_bus()
        self._tasks = [asyncio.create_task(b.run()) for b in (self.bus, self.writer)]
        for bus in (self.bus, self.writer):
            await _until(bus.connected.is_set, 30, f"{self.name}'s broker")
        await self.bus.barrier()

    async def disconnect(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
        await asyncio.gather(*getattr(self, "_tasks", []), return_exceptions=True)
        self._tasks = []

    def _on_cms(self, topic: str, payload: bytes) -> None:
        self.arrived[topic] = time.perf_counter()
        if payload:
            self.state[topic] = orjson.loads(payload)
        else:
            self.state.pop(topic, None)

    def _on_reply(self, topic: str, payload: bytes) -> None:
        if topic.startswith("replies/peer-"):
            self.traffic.on(topic, payload)

    def start_broker(self) -> None:
        self.local.start()
        self.broker = self.local

    def start_replicator(self, peers: list[Site]) -> None:
        urls = orjson.dumps([f"mqtts://127.0.0.1:{p.local.tls_port}" for p in peers]).decode()
        argv = [
            sys.executable,
            "-m",
            "services.replicator",
            "--agent-id",
            f"replicator-{self.name}",
        ]
        argv += ["--site", self.name, "--peers", urls, "--anti-entropy-s", "30"]
        argv += ["--peer-tls-ca", str(self.peer_cas)]  # the peers' CAs
        mqtt = self.local.login(f"replicator-{self.name}", "replicator")
        self.replicator = spawn(argv, mqtt, state_dir=self.workdir)

    def stop(self) -> None:
        if self.replicator is not None:
            stop(self.replicator)
        if self.broker is not None:
            self.broker.stop()
        self.replicator = self.broker = None

    def value(self, topic: str) -> Any:
        entry = self.state.get(topic)
        return None if entry is None else entry["value"]

    def under(self, prefix: str) -> dict[str, Any]:
        return {t: e["value"] for t, e in self.state.items() if t.startswith(prefix)}


async def bench(args: argparse.Namespace) -> int:
    configure_logging("bench", level="warning")
    result: dict[str, Any] = {"sites": len(SITES), "machine": _machine()}
    with tempfile.TemporaryDirectory() as tmp:
        tag = uuid.uuid4().hex[:6]
        sites = [Site(name, Path(tmp), tag) for name in SITES]
        sites[0].peer_cas.write_text("".join(s.local.credentials.ca.read_text() for s in sites))
        try:
            for site in sites:
                for other in sites:
                    if other is not site:
                        site.peer_of(other)
                site.start_broker()
            for site in sites:
                site.start_replicator([p for p in sites if p is not site])
            for site in sites:
                await site.connect()
            await _ready(sites, args.quiet_s)
            rng = random.Random(args.seed)
            result["spread"] = await _spread(sites, args, rng, tag)
            result["partition"] = await _partition(sites, args, rng, tag)
            result["conflicts"] = await _conflicts(sites, args, tag)
            result["deletes"] = await _deletes(sites, args, rng, tag)
            result["links"] = {s.name: s.traffic.snapshot() for s in sites}
        finally:
            for site in sites:
                await site.disconnect()
                site.stop()
        if args.bridge_probe:
            result["bridge_probe"] = await bridge_probe(Path(tmp) / "bridges")
    print_json(result)
    return 0


async def _until(predicate: Any, timeout: float, what: str) -> float:
    """Seconds until `predicate()` holds (polled every 5 ms); SystemExit when it never does."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"bench replicate: {what} not reached within {timeout:.0f} s")
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def _ready(sites: list[Site], quiet_s: float) -> None:
    """Every replicator's card is at every other site, and a probe entry went around."""
    cards = [
        (site, f"cms/sites/{other.name}/agents/replicator-{other.name}")
        for site in sites
        for other in sites
        if other is not site
    ]
    await _until(lambda: all(t in s.state for s, t in cards), 60, "replicators online")
    for i, site in enumerate(sites):
        await cms.put(site.writer, f"configs/bench-probe/{site.tag}-{i}", i, version=1)
    probes = [f"cms/configs/bench-probe/{sites[0].tag}-{i}" for i in range(len(sites))]
    await _until(lambda: all(t in s.state for s in sites for t in probes), 60, "first entries")
    await asyncio.sleep(quiet_s)  # let the first pulls finish before counting


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 1)}


async def _spread(sites: list[Site], args: argparse.Namespace, rng: random.Random, tag: str) -> Any:
    before = [s.traffic.snapshot() for s in sites]
    keys = [f"configs/bench-{tag}/k{i:05d}" for i in range(args.entries)]
    written: dict[str, tuple[float, int]] = {}  # topic → (when, site index)
    started = time.perf_counter()
    for i, key in enumerate(keys):
        if args.rate > 0:
            await asyncio.sleep(max(0.0, started + i / args.rate - time.perf_counter()))
        index = rng.randrange(len(sites))
        written[f"cms/{key}"] = (time.perf_counter(), index)
        await cms.put(sites[index].writer, key, {"i": i, "at": sites[index].name}, version=1)
    wrote_s = time.perf_counter() - started
    await _until(lambda: all(t in s.state for s in sites for t in written), 120, "spread")
    latencies = [
        max(s.arrived[topic] for s in sites) - when for topic, (when, _) in written.items()
    ]
    await asyncio.sleep(args.quiet_s)  # anything extra (an echo, a second copy) shows now
    after = [s.traffic.snapshot() for s in sites]
    live = sum(a["live_records"] - b["live_records"] for a, b in zip(after, before, strict=True))
    messages = sum(
        a["live_messages"] - b["live_messages"] for a, b in zip(after, before, strict=True)
    )
    crossings = [sum(s.traffic.per_key.get(k, 0) for s in sites) for k in keys]
    per_link = max(s.traffic.per_key.get(k, 0) for s in sites for k in keys)
    return {
        "entries": args.entries,
        "write_rate_per_s": args.rate or None,
        "wrote_in_s": round(wrote_s, 2),
        "time_until_every_site_has_it": _percentiles(latencies),
        "records_per_update": round(live / args.entries, 3),
        "messages_per_update": round(messages / args.entries, 3),
        "link_crossings_per_update": {"min": min(crossings), "max": max(crossings)},
        "most_copies_one_site_received_of_an_update": per_link,
        "repaired_records": sum(
            a["repair_records"] - b["repair_records"] for a, b in zip(after, before, strict=True)
        ),
    }


async def _partition(
    sites: list[Site], args: argparse.Namespace, rng: random.Random, tag: str
) -> Any:
    a, b, c = sites
    prefix = f"cms/configs/bench-{tag}/"
    total = len(c.under(prefix))
    card = "cms/agents/replicator-c"
    started = c.state[card]["value"]["started_at"]
    await c.disconnect()
    c.stop()  # the whole site: replicator first, then its broker (which saves its store)
    keys = sorted(t.removeprefix("cms/") for t in a.under(prefix))
    changed = rng.sample(keys, min(args.changed, len(keys)))
    deleted = rng.sample(
        sorted(set(keys) - set(changed)), min(args.deleted, len(keys) - len(changed))
    )
    for i, key in enumerate(changed):
        writer = (a, b)[i % 2]
        await cms.put(writer.writer, key, {"changed": i, "at": writer.name}, version=2)
    for i, key in enumerate(deleted):
        await cms.delete((a, b)[i % 2].writer, key)
    await _until(lambda: a.under(prefix) == b.under(prefix), 60, "a and b agreeing")
    expected = a.under(prefix)
    before = [s.traffic.snapshot() for s in sites]
    marks = [len(s.traffic.repaired_keys) for s in sites]
    restarted = time.perf_counter()
    c.start_broker()
    await c.connect()  # before its replicator starts: every change it makes is seen
    c.start_replicator([a, b])

    def replicator_up() -> bool:
        entry = c.state.get(card)
        return entry is not None and entry["value"]["started_at"] > started

    up_s = await _until(replicator_up, 60, "c's replicator back")
    try:
        await _until(lambda: c.under(prefix) == expected, 120, "c catching up")
    except SystemExit:
        held = c.under(prefix)
        wrong = sorted(k for k in set(held) | set(expected) if held.get(k) != expected.get(k))
        print(
            f"c differs in {len(wrong)}: {[(k, held.get(k), expected.get(k)) for k in wrong[:5]]}",
            file=sys.stderr,
        )
        raise
    converge_s = time.perf_counter() - restarted
    await asyncio.sleep(args.quiet_s)
    after = [s.traffic.snapshot() for s in sites]
    repaired_into_c = sum(after[i]["repair_records"] - before[i]["repair_records"] for i in (0, 1))
    keys_into_c = [k for i in (0, 1) for k in sites[i].traffic.repaired_keys[marks[i] :]]
    bench_keys = [k for k in keys_into_c if k.startswith(prefix.removeprefix("cms/"))]
    return {
        "entries_at_c_before": total,
        "changed_while_away": len(changed),
        "deleted_while_away": len(deleted),
        "time_to_converge_s": round(converge_s, 2),
        "of_which_replicator_start_s": round(up_s, 2),
        "repair_after_replicator_started_s": round(converge_s - up_s, 2),
        "records_repaired_into_c": repaired_into_c,
        "of_which_bench_entries": len(bench_keys),
        "bench_entries_repaired_twice": len(bench_keys) - len(set(bench_keys)),
        "others": sorted({k for k in keys_into_c if k not in bench_keys}),
        "records_repaired_out_of_c": after[2]["repair_records"] - before[2]["repair_records"],
        "versions_listed": sum(
            a_["versions"] - b_["versions"] for a_, b_ in zip(after, before, strict=True)
        ),
        "digest_rounds": sum(
            a_["digests"] - b_["digests"] for a_, b_ in zip(after, before, strict=True)
        ),
    }


async def _conflicts(sites: list[Site], args: argparse.Namespace, tag: str) -> Any:
    a, b, _ = sites
    keys = [f"tenants/bench-{tag}/t{i:04d}/limit" for i in range(args.conflicts)]
    await asyncio.gather(
        *(
            cms.put(site.writer, key, f"{site.name}-{i}", version=7)
            for i, key in enumerate(keys)
            for site in (a, b)
        )
    )
    topics = [f"cms/{k}" for k in keys]

    def agreed() -> bool:
        return all(
            all(t in s.state for s in sites) and len({s.value(t) for s in sites}) == 1
            for t in topics
        )

    agree_s = await _until(agreed, 60, "agreement on conflicting writes")
    # the greater origin wins a tie of versions: the two writers are bench-a-... and bench-b-...
    predicted = all(sites[0].value(t).startswith("b-") for t in topics)
    return {
        "keys": len(keys),
        "written_at": ["a", "b"],
        "same_version": 7,
        "identical_at_every_site": agreed(),
        "winner_as_the_rule_predicts": predicted,
        "time_to_agree_s": round(agree_s, 3),
    }


async def _deletes(
    sites: list[Site], args: argparse.Namespace, rng: random.Random, tag: str
) -> Any:
    prefix = f"cms/configs/bench-{tag}/"
    present = sorted(sites[0].under(prefix))
    victims = rng.sample(present, min(args.deletes, len(present)))
    marks = {s.name: len(s.state) for s in sites}
    when: dict[str, float] = {}
    started = time.perf_counter()
    for i, topic in enumerate(victims):
        if args.rate > 0:
            await asyncio.sleep(max(0.0, started + i / args.rate - time.perf_counter()))
        site = rng.choice(sites)
        when[topic] = time.perf_counter()
        await cms.delete(site.writer, topic)
    await _until(lambda: all(t not in s.state for s in sites for t in victims), 60, "deletes")
    latencies = [max(s.arrived[t] for s in sites) - when[t] for t in victims]
    await asyncio.sleep(args.quiet_s)
    back = sum(1 for s in sites for t in victims if t in s.state)
    return {
        "deleted": len(victims),
        "time_until_gone_everywhere": _percentiles(latencies),
        "came_back": back,
        "identical_at_every_site": len(
            {orjson.dumps(s.under(prefix), option=orjson.OPT_SORT_KEYS) for s in sites}
        )
        == 1,
        "entries_left": len(sites[0].under(prefix)),
        "cms_size_changes": {s.name: len(s.state) - marks[s.name] for s in sites},
    }


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2)}


# -- why not a mosquitto bridge --------------------------------------------------------------


def _bridge(name: str, port: int) -> str:
    return (
        f"connection {name}\naddress 127.0.0.1:{port}\nbridge_protocol_version mqttv50\n"
        f"try_private true\ncleansession true\nrestart_timeout 1\nremote_clientid {name}\n"
        "topic cms/# both 1\n"
    )


def _bridged_broker(workdir: Path, port: int, bridges: str) -> subprocess.Popen[bytes]:
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    for folder in (workdir.parent.parent, workdir.parent, workdir):
        os.chmod(folder, 0o755)
    os.chmod(workdir / "data", 0o777)
    conf = workdir / "mosquitto.conf"
    conf.write_text(local_config(port, workdir / "data", secure=False) + "\n" + bridges)
    log = (workdir / "mosquitto.log").open("ab")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while not broker_answers("127.0.0.1", port, 0.2):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench replicate: bridged mosquitto on {port} did not start")
        time.sleep(0.05)
    return proc


async def _bridge_state(port: int, name: str, states: list[bytes], ready: asyncio.Event) -> None:
    """Follow a bridge's notification topic (`1` connected, `0` not) on its own broker."""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(f"$SYS/broker/connection/{name}/state", qos=1)
        ready.set()
        async for message in client.messages:
            states.append(bytes(message.payload))  # type: ignore[arg-type]


async def _snapshot(port: int) -> dict[str, str]:
    """What a broker holds under cms/ (retained), read by a fresh client."""
    state: dict[str, str] = {}
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe("cms/#", qos=1)
        await client.subscribe("fence/snapshot", qos=1)
        await client.publish("fence/snapshot", b"", qos=1)
        async for message in client.messages:
            if message.topic.value == "fence/snapshot":
                return state
            state[message.topic.value] = bytes(message.payload).decode()  # type: ignore[arg-type]
    return state


async def _publish(port: int, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def _connected(states: list[bytes], after: int = 0) -> None:
    await _until(lambda: b"1" in states[after:], 60, "bridge connected")


async def bridge_probe(root: Path) -> dict[str, Any]:
    """(1) a ring of three `cms/# both` bridges: how often one publish arrives; (2) two bridged
    brokers, one stopped while the other deletes a key and updates another, then restarted."""
    out: dict[str, Any] = {}
    ports = [free_port() for _ in range(3)]
    names = [f"ring-{i}" for i in range(3)]
    procs = [
        _bridged_broker(root / names[i], ports[i], _bridge(names[i], ports[(i + 1) % 3]))
        for i in range(3)
    ]
    watchers: list[asyncio.Task[None]] = []
    try:
        for i in range(3):
            states: list[bytes] = []
            ready = asyncio.Event()
            watchers.append(asyncio.create_task(_bridge_state(ports[i], names[i], states, ready)))
            await ready.wait()
            await _connected(states)
        counted = 0
        async with aiomqtt.Client("127.0.0.1", ports[1], protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe("cms/probe", qos=1)
            await _publish(ports[0], "cms/probe", b'{"v":1}')
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    async for _ in c.messages:
                        counted += 1
        out["ring_of_three_bridges"] = {
            "bridges": "a->b, b->c, c->a, each `topic cms/# both 1`, mqttv50, try_private true",
            "published_once_at_a": True,
            "arrivals_at_b_within_2_s": counted,
        }
    finally:
        for task in watchers:
            task.cancel()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    pa, pb = free_port(), free_port()
    b = _bridged_broker(root / "pair-b", pb, "")
    a = _bridged_broker(root / "pair-a", pa, _bridge("pair-a", pb))
    states, ready = [], asyncio.Event()
    watcher = asyncio.create_task(_bridge_state(pa, "pair-a", states, ready))
    try:
        await ready.wait()
        await _connected(states)
        await _publish(pa, "cms/k", b"k v1")
        await _publish(pa, "cms/j", b"j v1")
        await asyncio.sleep(0.5)
        both_before = {"a": await _snapshot(pa), "b": await _snapshot(pb)}
        b.terminate()
        b.wait(10)  # b saves its store on the way down
        mark = len(states)
        await _publish(pa, "cms/k", b"")  # deleted at a while b is away
        await _publish(pa, "cms/j", b"j v2")  # and updated
        a_during = await _snapshot(pa)
        b = _bridged_broker(root / "pair-b", pb, "")
        await _connected(states, mark)
        await asyncio.sleep(2.0)
        out["pair_after_a_partition"] = {
            "bridge": "a->b `topic cms/# both 1`; b stopped, k deleted and j updated at a",
            "before": both_before,
            "a_while_b_away": a_during,
            "a_after": await _snapshot(pa),
            "b_after": await _snapshot(pb),
        }
    finally:
        watcher.cancel()
        for proc in (a, b):
            proc.terminate()
            proc.wait(10)
    return out
