"""The CMS replicator: the merge rule as pure functions, then real sites (one mosquitto each).

No timing is asserted; every wait is for an event or a count, with a generous timeout.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest

from schemas import CmsEntry, Error, ReplicaDigest
from services.core import cms
from services.core.bus import Bus
from services.core.errors import NotAuthorized, RemoteError
from services.core.settings import MqttSettings
from services.core.topics import ERRORS, REPLICA_CHANGES, REPLICA_DIGEST
from services.replicator.__main__ import peer_settings
from services.replicator.merge import (
    BUCKETS,
    Record,
    Replica,
    differing,
    fold,
    group_of,
    merge,
)
from services.replicator.rules import DEFAULT_RULES, KeyMap, Rule
from services.replicator.service import Replicator
from tests.broker import ROOT, Broker
from tests.conftest import mqtt_client, running, service_env, wait_for

# -- the merge rule, pure ---------------------------------------------------------------------


def _random_ops(rng: random.Random, keys: list[str]) -> list[tuple[str, Record]]:
    ops = []
    for _ in range(rng.randint(1, 40)):
        key, version, origin = rng.choice(keys), rng.randint(1, 5), rng.choice("abc")
        at = rng.choice([1.0, 2.0, 3.5])
        if rng.random() < 0.3:
            ops.append((key, Record(version, origin, at, None, True)))
        else:
            value = rng.choice([1, 2.5, "x", None, {"a": [1, 2]}, {"a": [2, 1]}])
            ops.append((key, Record(version, origin, at, value)))
    return ops


def _state(replica: Replica) -> dict[str, tuple]:
    return {key: record.rank for key, record in replica.records.items()}


def _pull(mine: Replica, theirs: Replica) -> int:
    """One anti-entropy pull by digest: the buckets that differ, then the newer records."""
    pairs = differing(
        mine.digest(lambda g: True),
        {g: (s.count, s.total, s.buckets) for g, s in theirs.digest(lambda g: True).items()},
        set(mine.groups()) | set(theirs.groups()),
    )
    moved = 0
    for group in {g for g, _ in pairs}:
        buckets = [b for g, b in pairs if g == group]
        for key, record in list(theirs.in_buckets(group, buckets)):
            moved += mine.merge(key, record)
    return moved


def test_merge_is_commutative_associative_and_idempotent():
    rng = random.Random(7)
    records = [r for _, r in _random_ops(rng, ["k"]) for _ in range(2)]
    for a in records:
        assert merge(a, a) is a
        for b in records:
            assert merge(a, b).rank == merge(b, a).rank
            for c in records[:8]:
                assert merge(merge(a, b), c).rank == merge(a, merge(b, c)).rank


def test_the_rule_orders_by_version_then_origin_then_delete_then_content():
    assert merge(Record(2, "a", 1.0, "x"), Record(1, "z", 9.0, "y")).value == "x"
    assert merge(Record(3, "a", 1.0, "x"), Record(3, "b", 1.0, "y")).value == "y"
    tombstone = Record(3, "b", 1.0, "y").tombstone(origin="b", at=2.0)
    assert tombstone.version == 4 and tombstone.deleted
    assert merge(Record(4, "b", 5.0, "late"), tombstone).deleted  # same version and origin
    same = [Record(1, "a", 1.0, "x"), Record(1, "a", 1.0, "y")]
    assert merge(*same).value == merge(*reversed(same)).value  # even a writer's mistake


def test_any_interleaving_duplication_or_reordering_converges():
    for seed in range(400):
        rng = random.Random(seed)
        keys = [f"parameters/m/{i}" for i in range(rng.randint(1, 4))] + ["sites/b/agents/w1"]
        ops = _random_ops(rng, keys)
        expected = {key: record.rank for key, record in fold(ops).items()}
        replicas = [Replica() for _ in range(3)]
        for replica in replicas:
            delivery = ops + [rng.choice(ops) for _ in range(rng.randint(0, len(ops)))]
            rng.shuffle(delivery)
            for key, record in delivery:
                replica.merge(key, record)
        assert all(_state(r) == expected for r in replicas), seed
        digests = [r.digest(lambda g: True) for r in replicas]
        assert digests[0] == digests[1] == digests[2]


def test_partial_delivery_then_digest_pulls_converge_and_move_only_what_differs():
    for seed in range(200):
        rng = random.Random(seed)
        keys = [f"{family}/k{i}" for family in ("parameters", "configs") for i in range(40)]
        ops = _random_ops(rng, keys) * 2
        replicas = [Replica() for _ in range(3)]
        for key, record in ops:
            for replica in rng.sample(replicas, rng.randint(1, 3)):
                replica.merge(key, record)
        expected = {key: record.rank for key, record in fold(ops).items()}
        for _round in range(2):  # everyone pulls from everyone, in a random order
            pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
            rng.shuffle(pairs)
            for a, b in pairs:
                _pull(replicas[a], replicas[b])
        assert all(_state(r) == expected for r in replicas), seed
        assert all(_pull(a, b) == 0 for a in replicas for b in replicas)  # nothing left


def test_digests_tell_exactly_which_buckets_differ():
    a, b = Replica(), Replica()
    for i in range(500):
        record = Record(1, "x", 1.0, i)
        a.merge(f"parameters/k{i}", record)
        b.merge(f"parameters/k{i}", record)
    assert a.digest(lambda g: True) == b.digest(lambda g: True)
    b.merge("parameters/k7", Record(2, "x", 2.0, "new"))
    theirs = {g: (s.count, s.total, s.buckets) for g, s in b.digest(lambda g: True).items()}
    pairs = differing(a.digest(lambda g: True), theirs, ["parameters"])
    assert len(pairs) == 1 and pairs[0][0] == "parameters"
    assert [k for k, _ in b.in_buckets("parameters", [pairs[0][1]])].count("parameters/k7") == 1
    assert a.expire(time.time(), 60) == []
    a.merge("parameters/gone", Record(1, "x", 0.0, None, True))
    assert a.expire(time.time(), 60) == ["parameters/gone"]


def test_keys_map_between_a_site_and_the_names_all_sites_share():
    keys = KeyMap("a", DEFAULT_RULES)
    card = keys.from_local("cms/agents/worker-1")
    assert card is not None and (card.key, card.owner) == ("sites/a/agents/worker-1", "a")
    shared = keys.from_local("cms/parameters/m/temperature")
    assert shared is not None and (shared.key, shared.owner) == ("parameters/m/temperature", None)
    remote = keys.from_local("cms/sites/b/agents/worker-1")
    assert remote is not None and remote.owner == "b" and remote.rule is None
    assert keys.from_local("cms/inference/r1/phase_0_output") is None  # local
    assert keys.from_local("cms/unknown/thing") is None
    assert keys.to_local("sites/a/agents/worker-1") == "cms/agents/worker-1"
    assert keys.to_local("sites/b/agents/worker-1") == "cms/sites/b/agents/worker-1"
    assert keys.accepts("sites/b/agents/worker-1", "b")
    assert not keys.accepts("sites/b/agents/worker-1", "c")  # only from its owner
    assert not keys.accepts("sites/a/agents/worker-1", "b")  # our own: only we say
    assert not keys.accepts("inference/r1/x", "b")  # not shared here
    assert group_of("sites/b/agents/worker-1/status") == "sites/b/agents"
    with pytest.raises(ValueError, match="replicator's own"):
        Rule(filter="sites/#", scope="shared")


def test_peer_urls_become_mqtt_settings():
    local = MqttSettings(host="localhost", port=1883, keepalive=7)
    peer = peer_settings("mqtt://bob:s3cret@site-b.example:1884", local)
    assert (peer.host, peer.port, peer.username, peer.keepalive) == (
        "site-b.example",
        1884,
        "bob",
        7,
    )
    assert peer.password is not None and peer.password.get_secret_value() == "s3cret"
    assert peer_settings("10.0.0.2", local).address == "10.0.0.2:1883"
    secure = peer_settings(
        "mqtts://site-b.example",
        local,
        account="peer-a",
        password_file=Path("s"),
        tls_ca=Path("ca"),
    )
    assert (secure.port, secure.uses_tls, secure.tls_ca, secure.username) == (
        8883,
        True,
        Path("ca"),
        "peer-a",
    )
    assert secure.password_file == Path("s") and not peer_settings("mqtt://x", local).uses_tls
    with pytest.raises(ValueError):
        peer_settings("http://x:1", local)


# -- real sites ---------------------------------------------------------------------------------


class Site:
    """One site: a mosquitto of its own (its own accounts and CA) and an in-process replicator
    (restartable), whose links log in to each peer's broker as peer-<site>, over TLS."""

    def __init__(self, name: str, broker: Broker, rules: tuple[Rule, ...] = DEFAULT_RULES) -> None:
        self.name, self.broker, self.rules = name, broker, rules
        self.mqtt = broker.login(f"replicator-{name}", "replicator")
        self.peers: list[Site] = []
        self.replicator: Replicator | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def make(self) -> Replicator:
        bus = Bus(settings=self.mqtt, client_id=f"replicator-{self.name}", service="replicator")
        self.replicator = Replicator(
            bus,
            site=self.name,
            peers=[p.broker.login(f"peer-{self.name}", "peer", tls=True) for p in self.peers],
            rules=self.rules,
            anti_entropy_s=600,  # pulls happen on (re)connect and when a test asks
            request_timeout_s=5,
        )
        self._tasks = [asyncio.create_task(bus.run())]
        return self.replicator

    def start_loops(self) -> None:
        assert self.replicator is not None
        self._tasks += [asyncio.create_task(loop()) for loop in self.replicator.loops()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def restart(self) -> Replicator:
        replicator = self.make()
        await asyncio.wait_for(replicator.loaded.wait(), 20)
        self.start_loops()
        return replicator


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Callable[[int], list[Broker]]]:
    started: list[Broker] = []

    def start(n: int) -> list[Broker]:
        for i in range(n):
            broker = Broker(tmp_path / f"site-{len(started)}-{i}")
            broker.start()
            started.append(broker)
        return started[-n:]

    yield start
    for broker in started:
        broker.stop()


@asynccontextmanager
async def sites(brokers, n: int = 3, rules=DEFAULT_RULES) -> AsyncIterator[list[Site]]:  # type: ignore[no-untyped-def]
    """`n` fully meshed sites a, b, c..., settled (every link has pulled once)."""
    group = [Site(chr(ord("a") + i), b, rules) for i, b in enumerate(brokers(n))]
    for site in group:
        site.peers = [p for p in group if p is not site]
    try:
        replicators = [site.make() for site in group]
        await asyncio.wait_for(asyncio.gather(*(r.loaded.wait() for r in replicators)), 20)
        for site in group:
            site.start_loops()
        await asyncio.gather(*(r.settled() for r in replicators))
        yield group
    finally:
        for site in group:
            await site.stop()


class Watcher:
    """A plain client of one site's broker that records every CMS message it sees (an observer
    account); what a test writes there goes through the account that owns the key."""

    def __init__(self, site: Site, tag: str) -> None:
        self.site, self.tag = site, tag
        name = f"watch-{site.name}-{tag}"
        self.bus = Bus(settings=site.broker.login(name, "observer"), client_id=name, service="t")
        self.seen: list[tuple[str, bytes]] = []
        self.state: dict[str, CmsEntry] = {}
        self.bus.listen_raw("cms/#", self._on)
        self._writers: dict[str, Bus] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def writer(self, key: str) -> Bus:
        """A client whose account may write `key`: an agent's own entries are its own, the
        operators' families an operator's, the rest an orchestrator's."""
        levels = key.split("/")
        if levels[0] == "agents":
            name, role = levels[1], "worker"
        elif levels[0] in ("parameters", "configs", "tenants", "finetune", "scaling"):
            name, role = f"operator-{self.site.name}-{self.tag}", "operator"
        else:
            name, role = f"orch-{self.site.name}-{self.tag}", "orchestrator"
        if name not in self._writers:
            bus = Bus(settings=self.site.broker.login(name, role), client_id=name, service="t")
            self._tasks.append(asyncio.create_task(bus.run()))
            await asyncio.wait_for(bus.connected.wait(), 10)
            self._writers[name] = bus
        return self._writers[name]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on(self, topic: str, payload: bytes) -> None:
        self.seen.append((topic, payload))
        if payload:
            self.state[topic] = CmsEntry.model_validate_json(payload)
        else:
            self.state.pop(topic, None)

    def count(self, topic: str) -> int:
        return sum(1 for t, _ in self.seen if t == topic)

    def value(self, topic: str) -> object:
        entry = self.state.get(topic)
        return None if entry is None else entry.value

    def under(self, prefix: str) -> dict[str, object]:
        return {t: e.value for t, e in sorted(self.state.items()) if t.startswith(prefix)}


@asynccontextmanager
async def watching(group: list[Site], tag: str) -> AsyncIterator[list[Watcher]]:
    watchers = [Watcher(site, tag) for site in group]
    tasks = [asyncio.create_task(w.bus.run()) for w in watchers]
    try:
        for w in watchers:
            await asyncio.wait_for(w.bus.connected.wait(), 10)
            await w.bus.barrier()
        yield watchers
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in watchers:
            await w.close()


async def put(watcher: Watcher, key: str, value: object, version: int) -> None:
    """Write `key` at the watcher's site; the watcher sees it come back."""
    bus = await watcher.writer(key)
    await cms.put(bus, key, value, version=version)
    await bus.barrier()


async def delete(watcher: Watcher, key: str) -> None:
    bus = await watcher.writer(key)
    await cms.delete(bus, key)
    await bus.barrier()


def totals(group: list[Site], counter: str) -> dict[str, int]:
    return {
        s.name: sum(getattr(link.counters, counter) for link in s.replicator.links)  # type: ignore[union-attr]
        for s in group
    }


async def test_an_entry_written_at_one_site_reaches_every_other_site_once(brokers, uid):
    async with sites(brokers) as group, watching(group, uid) as (wa, wb, wc):
        live0, pulled0 = totals(group, "live_records"), totals(group, "pulled_records")
        key = f"parameters/m-{uid}/temperature"
        await put(wa, key, 0.7, 1)
        await wait_for(lambda: wb.value(f"cms/{key}") == 0.7 and wc.value(f"cms/{key}") == 0.7)
        # a site's own entry shows under its name elsewhere, never among the local agents
        await put(wa, f"agents/w-{uid}", {"kind": "worker"}, 5_000_000)
        remote = f"cms/sites/a/agents/w-{uid}"
        await wait_for(lambda: wb.value(remote) is not None and wc.value(remote) is not None)
        for site in group:  # a full anti-entropy round: nothing more moves
            await site.replicator.sync_now()  # type: ignore[union-attr]
        for w in (wb, wc):
            assert w.count(f"cms/{key}") == 1 and w.count(remote) == 1
            assert w.value(f"cms/agents/w-{uid}") is None
        assert wa.count(f"cms/{key}") == 1  # no echo back to where it was written
        # a client at b writing an older version does not win: b's replicator puts it back
        await put(wa, key, 0.9, 3)
        await wait_for(lambda: wb.value(f"cms/{key}") == 0.9 and wc.value(f"cms/{key}") == 0.9)
        await put(wb, key, 0.1, 2)
        await wait_for(lambda: wb.count(f"cms/{key}") == 4)  # 0.7, 0.9, the stale 0.1, 0.9
        assert wb.value(f"cms/{key}") == 0.9 and wb.state[f"cms/{key}"].version == 3
        await group[1].replicator.sync_now()  # type: ignore[union-attr]
        assert wa.count(f"cms/{key}") == 2 and wc.count(f"cms/{key}") == 2  # never saw 0.1
        live = {n: v - live0[n] for n, v in totals(group, "live_records").items()}
        assert live == {"a": 6, "b": 0, "c": 0}  # three changes, once over each of a's links
        assert totals(group, "pulled_records") == pulled0


async def test_concurrent_writes_and_deletes_leave_every_site_identical(brokers, uid):
    async with sites(brokers) as group, watching(group, uid) as watchers:
        rng = random.Random(14)
        keys = [f"configs/{uid}/k{i}" for i in range(6)]
        writers = watchers
        for i, key in enumerate(keys):  # every key exists everywhere first
            await put(writers[i % 3], key, "initial", 1)
        await wait_for(lambda: all(len(w.under(f"cms/configs/{uid}/")) == 6 for w in watchers))
        ops = []
        for _ in range(60):  # the same versions at several sites at once, and deletes
            key, site = rng.choice(keys), rng.randrange(3)
            if rng.random() < 0.25:
                ops.append(delete(writers[site], key))
            else:
                ops.append(put(writers[site], key, f"{site}-{rng.random():.4f}", rng.randint(2, 4)))
        rng.shuffle(ops)
        await asyncio.gather(*ops)
        for _round in range(2):
            for site in group:
                await site.replicator.sync_now()  # type: ignore[union-attr]

        def states() -> list[dict[str, object]]:
            return [w.under(f"cms/configs/{uid}/") for w in watchers]

        try:
            await wait_for(lambda: states()[0] == states()[1] == states()[2])
        finally:
            print(states())
        replicas = [{k: r.rank for k, r in s.replicator.replica.records.items()} for s in group]  # type: ignore[union-attr]
        assert replicas[0] == replicas[1] == replicas[2]


async def test_a_delete_propagates_and_a_stale_site_cannot_bring_it_back(brokers, uid):
    async with sites(brokers) as group, watching(group, uid) as (wa, wb, wc):
        key, topic = f"tenants/{uid}/limit", f"cms/tenants/{uid}/limit"
        await put(wa, key, 100, 3)
        await wait_for(lambda: all(w.value(topic) == 100 for w in (wa, wb, wc)))
        await group[2].stop()  # c is away: it keeps the entry
        await delete(wa, key)
        await wait_for(lambda: wb.value(topic) is None)
        assert wc.value(topic) == 100
        deleted_at = len(wa.seen), len(wb.seen)
        c = await group[2].restart()  # c comes back with its stale copy in its broker
        await c.settled()
        await wait_for(lambda: wc.value(topic) is None)
        for site in group:
            await site.replicator.sync_now()  # type: ignore[union-attr]
        assert wa.value(topic) is None and wb.value(topic) is None and wc.value(topic) is None
        assert not [t for t, p in wa.seen[deleted_at[0] :] if t == topic and p]  # never back
        assert not [t for t, p in wb.seen[deleted_at[1] :] if t == topic and p]
        tombstones = [s.replicator.replica.get(key) for s in group]  # type: ignore[union-attr]
        assert all(t is not None and t.deleted and t.version == 4 for t in tombstones)
        # a site's own entries: deleted live, and deleted while c is away (c drops its copy
        # when it pulls from the owner, who no longer has it)
        cards = [f"agents/w{i}-{uid}" for i in range(2)]
        for card in cards:
            await put(wa, card, {"kind": "worker"}, 1_000_000)
        remote = [f"cms/sites/a/{card}" for card in cards]
        await wait_for(lambda: all(w.value(t) is not None for w in (wb, wc) for t in remote))
        await delete(wa, cards[0])
        await wait_for(lambda: wb.value(remote[0]) is None and wc.value(remote[0]) is None)
        await group[2].stop()
        await delete(wa, cards[1])
        await wait_for(lambda: wb.value(remote[1]) is None)
        assert wc.value(remote[1]) is not None
        c = await group[2].restart()
        await wait_for(lambda: wc.value(remote[1]) is None)
        # a key written again after its delete lives again (one version above its tombstone)
        await put(wc, key, 200, 1)
        await wait_for(
            lambda: all(topic in w.state and w.state[topic].version == 5 for w in (wa, wb, wc))
        )
        assert all(w.value(topic) == 200 for w in (wa, wb, wc))


async def test_a_partitioned_site_catches_up_by_digest_repair_of_only_what_differs(brokers, uid):
    async with sites(brokers) as group, watching(group, uid) as (wa, wb, wc):
        prefix = f"sessions/{uid}"
        for i in range(60):
            await put(wa if i % 2 else wb, f"{prefix}/u{i}", {"turn": 0}, 1)
        await wait_for(lambda: all(len(w.under(f"cms/{prefix}/")) == 60 for w in (wa, wb, wc)))
        c = group[2].replicator
        assert c is not None
        await group[2].stop()  # c partitioned: what a and b push to it is lost
        for i in range(20):
            await put(wa, f"{prefix}/u{i}", {"turn": 1}, 2)
        for i in range(20, 30):
            await put(wb, f"{prefix}/u{i}", {"turn": 1}, 2)
        for i in range(30, 35):
            await delete(wa, f"{prefix}/u{i}")
        expected = {f"cms/{prefix}/u{i}": {"turn": 1} for i in range(30)}
        expected |= {f"cms/{prefix}/u{i}": {"turn": 0} for i in range(35, 60)}
        await wait_for(lambda: wa.under(f"cms/{prefix}/") == wb.under(f"cms/{prefix}/") == expected)
        assert len(wc.under(f"cms/{prefix}/")) == 60  # still the old state
        c = await group[2].restart()
        await asyncio.gather(*(s.replicator.settled() for s in group))  # type: ignore[union-attr]
        await wait_for(lambda: wc.under(f"cms/{prefix}/") == expected)
        # c fetched the 35 differing entries once (from whichever peer it asked first); a and b
        # fetched nothing from c, which had nothing newer
        assert sum(link.counters.pulled_records for link in c.links) == 35
        assert c.counters.applied == 35
        assert c.counters.stale == 0


async def test_bad_input_gets_an_error_and_the_replicator_keeps_running(brokers, uid):
    async with sites(brokers, 2) as group, watching(group, uid) as (wa, wb):
        errors: list[Error] = []
        await wa.bus.follow(
            ERRORS, lambda request: errors.append(request.body), service="replicator"
        )
        wrong = orjson.dumps({"v": 1, "type": "replica_changes", "site": "zz", "records": [{}]})
        zz = group[0].broker.login("peer-zz", "peer")  # another site's link: only its topics
        async with mqtt_client(zz) as client:
            # not JSON, on the digest topic, with no response topic; then a wrong schema
            await client.publish(REPLICA_DIGEST.format(site="zz"), b"{nope", qos=1)
            await client.publish(REPLICA_CHANGES.format(site="zz"), wrong, qos=1)
        await wait_for(lambda: {e.code for e in errors} >= {"bad_json", "bad_schema"})
        digest = ReplicaDigest(site="zz", session="s1", buckets=BUCKETS + 1, groups={})
        link = Bus(settings=zz, client_id="peer-zz", service="t")
        async with running(link):
            with pytest.raises(RemoteError, match="buckets"):
                await link.request(
                    REPLICA_DIGEST.format(site="zz"), digest, deadline=time.time() + 10
                )
            spoofed = ReplicaDigest(site="b", session="s1", buckets=BUCKETS, groups={})
            with pytest.raises(RemoteError, match="bad_request"):
                await link.request(
                    REPLICA_DIGEST.format(site="zz"), spoofed, deadline=time.time() + 10
                )
            refused = ReplicaDigest(site="b", session="s1", buckets=BUCKETS, groups={})
            with pytest.raises(NotAuthorized):  # posing as site b: the broker refuses it
                await link.request(
                    REPLICA_DIGEST.format(site="b"), refused, deadline=time.time() + 2
                )
        await put(wa, f"parameters/{uid}/after", "still replicating", 1)
        await wait_for(lambda: wb.value(f"cms/parameters/{uid}/after") == "still replicating")


async def test_edgecollab_up_runs_sites_that_replicate(tmp_path, uid):
    """Two sites on one box (one state dir: one set of accounts, one CA): each replicator logs
    in to the other's broker as peer-<site>, over TLS."""
    from tools.common.broker import broker_answers, free_port
    from tools.common.credentials import Credentials

    ports = {"a": free_port(), "b": free_port()}
    tls = {"a": free_port(), "b": free_port()}
    env = {**service_env(MqttSettings()), "EDGECOLLAB_STATE_DIR": str(tmp_path)}

    def up(site: str, other: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "tools.cli.main", "up", "--only", "replicator",
             "--broker", f"127.0.0.1:{ports[site]}", "--tls-port", str(tls[site]),
             "--cert-port", "0", "--site", site, "--peer", f"mqtts://127.0.0.1:{tls[other]}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    ups = {"a": up("a", "b")}
    try:  # b after a's broker runs: b's account (peer-b) reaches it by a reload
        await wait_for(lambda: (tmp_path / "site-a" / "mosquitto.pid").exists(), 30)
        ups["b"] = up("b", "a")
        await wait_for(lambda: all(broker_answers("127.0.0.1", p) for p in ports.values()), 30)
        credentials = Credentials.of_state_dir(tmp_path)
        a, b = (
            Bus(
                settings=credentials.settings("operator-1", MqttSettings(port=ports[site])),
                client_id="operator-1",
                service="t",
            )
            for site in ("a", "b")
        )
        seen: dict[str, bytes] = {}
        b.listen_raw("cms/#", lambda topic, payload: seen.__setitem__(topic, payload))
        async with running(a), running(b):
            await wait_for(lambda: "cms/sites/a/agents/replicator-1" in seen, 30)
            await cms.put(a, f"tenants/{uid}/model", "qwen", version=1)
            await wait_for(lambda: f"cms/tenants/{uid}/model" in seen, 30)
        assert (tmp_path / "site-a" / "mosquitto.conf").exists()  # each site's broker apart
        assert set(credentials.accounts()) >= {"peer-a", "peer-b"}
    finally:
        for running_up in ups.values():
            running_up.send_signal(signal.SIGINT)
        outs = {site: up.communicate(timeout=30)[0] for site, up in ups.items()}
    for site, proc in ups.items():
        assert proc.returncode == 0, outs[site]
        assert "Traceback" not in outs[site], outs[site][-3000:]


async def test_a_broker_that_restarts_empty_loses_only_its_own_entries(brokers, uid):
    async with sites(brokers, 2) as group, watching(group, uid) as (wa, wb):
        shared, own = f"parameters/{uid}/top_k", f"agents/w-{uid}"
        await put(wb, shared, 40, 1)
        await put(wa, own, {"kind": "worker"}, 1_000_000)
        await wait_for(lambda: wa.value(f"cms/{shared}") == 40)
        await wait_for(lambda: wb.value(f"cms/sites/a/{own}") is not None)
        a = group[0].replicator
        assert a is not None
        sessions = a.bus.sessions
        group[0].broker.stop()
        (group[0].broker.workdir / "data" / "mosquitto.db").unlink(missing_ok=True)  # empty
        group[0].broker.start()
        await wait_for(lambda: a.bus.sessions > sessions and a.bus.connected.is_set())
        await a.settled()
        async with watching(group[:1], f"{uid}-2") as (wa2,):
            # the shared key is put back at a and never deleted at b; a's own entry is gone
            await wait_for(lambda: wa2.value(f"cms/{shared}") == 40)
            await wait_for(lambda: wb.value(f"cms/sites/a/{own}") is None)
        assert wb.value(f"cms/{shared}") == 40 and wb.count(f"cms/{shared}") == 1


async def test_a_volatile_entry_is_summarised_not_sent_at_every_change(brokers, uid):
    rules = (Rule(filter="agents/+/status", scope="site", min_interval_s=0.5), *DEFAULT_RULES)
    async with sites(brokers, 2, rules) as group, watching(group, uid) as (wa, wb):
        for i in range(30):
            await put(wa, f"agents/w-{uid}/status", {"active": i}, 1_000_000 + i)
        topic = f"cms/sites/a/agents/w-{uid}/status"
        await wait_for(lambda: wb.value(topic) == {"active": 29})  # the latest one arrives
        await group[0].replicator.sync_now()  # type: ignore[union-attr]
        assert wb.count(topic) < 30
        assert wb.value(topic) == {"active": 29}


def test_bench_replicate_reports_what_it_promises():
    """The benchmark's plumbing and counts at a small size (its timings are not asserted)."""
    sizes = ["--entries", "40", "--changed", "15", "--deleted", "5", "--conflicts", "5"]
    sizes += ["--quiet-s", "0.3"]
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "bench", "replicate", *sizes, "--deletes", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = orjson.loads(run.stdout)
    spread, partition = result["spread"], result["partition"]
    assert spread["records_per_update"] == 2.0  # once to each of the two other sites
    assert spread["most_copies_one_site_received_of_an_update"] == 1
    assert partition["of_which_bench_entries"] == 20  # exactly what differed, once
    assert partition["bench_entries_repaired_twice"] == 0
    assert result["conflicts"]["identical_at_every_site"]
    assert result["conflicts"]["winner_as_the_rule_predicts"]
    assert result["deletes"]["came_back"] == 0 and result["deletes"]["identical_at_every_site"]
