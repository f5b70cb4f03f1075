"""The CMS replicator: keeps this site's `cms/` in agreement with its peer sites'.

It mirrors the local `cms/#` (and its own tombstones) into a `Replica` keyed by the names all
sites share (`rules.KeyMap`), pushes this site's own changes to every peer once, applies what
peers push and what it pulls from them (the merge rule of `merge.py`; a site's own entries are
its word alone), and writes the result back into the local broker's retained store, which stays
the only state: a restarted replicator reloads it.

No loops, no echo: only a change made *here* (by a local client) is pushed, and only to the
peers directly; what arrives from a peer is written locally and never pushed again. The writes
the replicator makes itself are recognised when the broker hands them back (`_echo`). Entries
another site has that this one lacks, or has older, are fetched by digest repair (`link.py`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from schemas import (
    CmsEntry,
    Message,
    Rejected,
    ReplicaChanges,
    ReplicaDigest,
    ReplicaRecord,
    ReplicaVersions,
    ReplicaWant,
    Task,
    TaskResult,
    Tombstone,
)
from services.core import cms
from services.core.bus import Bus, Request
from services.core.connection import ConnectionLost
from services.core.errors import BadInput
from services.core.settings import MqttSettings
from services.core.topics import (
    CMS_ALL,
    CMS_KEY,
    REMOTE_TASKS,
    REPLICA_CHANGES,
    REPLICA_DIGEST,
    REPLICA_WANT,
    REPLICATION_PEER,
    TOMBSTONE,
    Address,
    BadTopic,
)
from services.core.wire import parse_payload
from services.replicator.link import PeerLink
from services.replicator.merge import (
    BUCKETS,
    Rank,
    Record,
    Replica,
    bucket_of,
    differing,
    group_of,
)
from services.replicator.rules import DEFAULT_RULES, SITES, KeyMap, Rule

log = structlog.get_logger("edgecollab.replicator")

VERSIONS_BUDGET = 96 * 1024  # bytes of versions in one answer (more: `next`)
WANT_BUDGET = 96 * 1024  # bytes of records in one answer to a want
GONE_KEEP_S = 60.0  # how long a deleted own entry is kept for links still to push it
LINK_STATE_S = 1.0  # how often each link's state is looked at (written when it changed)


@dataclass
class Counters:
    local_changes: int = 0  # changes made here and pushed (once to each peer)
    applied: int = 0  # records from peers that changed something here
    stale: int = 0  # records from peers that changed nothing (older, or already held)
    refused: int = 0  # records a peer may not send (another site's entries, unshared keys)
    local_writes: int = 0  # retained messages written to the local broker
    restored: int = 0  # local writes that lost to what the replicator holds, put back
    digests_served: int = 0
    wants_served: int = 0
    records_served: int = 0  # records sent in answer to wants


@dataclass
class Plan:
    """What a pull fetches after comparing versions: keys, the rank each had when asked for
    (a record that arrives after a newer one is not applied), and the peer's own entries it no
    longer has."""

    wants: list[str] = field(default_factory=list)
    expected: dict[str, Rank | None] = field(default_factory=dict)
    drops: list[tuple[str, Rank]] = field(default_factory=list)


class Replicator:
    """One site's replicator: the local broker on `bus`, a `PeerLink` per peer."""

    def __init__(
        self,
        bus: Bus,
        *,
        site: str,
        peers: Iterable[MqttSettings] = (),
        rules: Iterable[Rule] = DEFAULT_RULES,
        anti_entropy_s: float = 30.0,
        tombstone_ttl_s: float = 7 * 86400.0,
        request_timeout_s: float = 2.0,
    ) -> None:
        self.bus, self.site = bus, site
        self.keys = KeyMap(site, tuple(rules))
        self.replica = Replica()
        self.anti_entropy_s = anti_entropy_s
        self.ttl = tombstone_ttl_s
        self.run_id = uuid.uuid4().hex[:12]
        self.counters = Counters()
        self.loaded = asyncio.Event()  # the local CMS and tombstones are mirrored
        self.pull_lock = asyncio.Lock()
        self.links = [PeerLink(self, s, timeout_s=request_timeout_s) for s in peers]
        self._actual: dict[str, Rank] = {}  # local topic → rank of what the broker holds
        self._heard: dict[str, int] = {}  # local topic → bus session it was last heard in
        self._echo: collections.Counter[tuple[str, Rank | None]] = collections.Counter()
        self._in_flight: collections.Counter[str] = collections.Counter()  # echoes per topic
        self._echo_session = 0
        self._stored: dict[str, Rank] = {}  # key → rank of the retained tombstone held
        self._gone: dict[str, tuple[float, Record]] = {}  # own entries deleted, to push
        self._last_push: dict[str, float] = {}
        self._deferred: set[str] = set()
        self._peer_sessions: dict[str, str] = {}
        self._links_published: dict[str, dict[str, Any]] = {}
        self._writes: collections.deque[tuple[Address[Any], Message | None, float | None]] = (
            collections.deque()
        )
        self._echoes: collections.deque[tuple[str, Rank | None] | None] = collections.deque()
        self._wake = asyncio.Event()
        bus.listen_raw(CMS_ALL, self._on_local)
        bus.listen_raw(TOMBSTONE.filter(), self._on_tombstone)
        bus.listen(REPLICA_CHANGES, self._on_changes)
        bus.serve(REPLICA_DIGEST, self._on_digest)
        bus.serve(REPLICA_WANT, self._on_want)
        bus.serve(REMOTE_TASKS, self._on_remote_task)
        bus.on_connect(self._on_local_connect)

    def loops(self) -> list[Any]:
        """The background loops to run next to the bus (`run_until_stopped`)."""
        return [
            self._write_loop,
            self._sweep_loop,
            self._links_loop,
            *(link.run for link in self.links),
        ]

    # -- the local broker -------------------------------------------------------------------

    async def _on_local_connect(self) -> None:
        """After each (re)connection: wait for the retained snapshot, then treat what vanished
        meanwhile as deleted and put back what the broker lost."""
        session = self.bus.sessions
        await self.bus.barrier()
        if session != self.bus.sessions:
            return
        first = not self.loaded.is_set()
        self.loaded.set()
        pending = {topic for topic, _ in self._echo} | {e[0] for e in self._echoes if e}
        for topic in [t for t in self._actual if self._heard.get(t, 0) < session]:
            if topic not in pending:
                self._vanished(topic)
        for key in list(self.replica.records):
            self._materialize(key)
        log.info(
            "replicator.loaded" if first else "replicator.resynced",
            site=self.site,
            keys=len(self.replica),
            peers=len(self.links),
        )
        if not first:
            for link in self.links:
                link.want_pull()

    def _vanished(self, topic: str) -> None:
        """`topic` was not in the snapshot of a new session: lost by a broker that restarted
        empty, or deleted while we were away; the two look alike. This site's own entries
        follow its broker (its agents announce themselves again); shared keys and other sites'
        entries are put back: a broker's restart must not delete them at every site."""
        self._actual.pop(topic, None)
        place = self.keys.from_local(topic)
        if place is None:
            return
        if place.owner == self.site:
            self._local_state(topic, None)
        else:
            self._materialize(place.key)

    def _on_local(self, topic: str, payload: bytes) -> None:
        self._heard[topic] = self.bus.sessions
        record = None
        if payload:
            try:
                entry = parse_payload(CmsEntry, payload, self.bus.settings.max_payload)
            except BadInput as exc:
                self.bus.report(exc.code, f"bad CMS entry: {exc}", topic)
                return
            record = Record(entry.version, entry.origin, entry.updated_at, entry.value)
        rank = record.rank if record else None
        echo = self._take_echo(topic, rank)
        if not self._in_flight[topic]:
            # the broker stores and forwards in one order: with none of our writes to this
            # topic still to come back, what just came is what it holds
            if rank is None:
                self._actual.pop(topic, None)
            else:
                self._actual[topic] = rank
        if not echo:
            self._local_state(topic, record)
        elif not self._in_flight[topic]:  # a client's write may have landed before ours
            place = self.keys.from_local(topic)
            if place is not None:
                self._materialize(place.key)

    def _local_state(self, topic: str, record: Record | None) -> None:
        """A client (not this replicator) made the local broker hold `record` under `topic`."""
        place = self.keys.from_local(topic)
        loaded = self.loaded.is_set()
        if place is None:
            if loaded and topic.startswith(f"cms/{SITES}/"):
                self.bus.report("bad_request", "cms/sites/ is written by the replicator", topic)
            return
        key, current = place.key, self.replica.get(place.key)
        if place.rule is None:  # another site's entry: only the replicator writes those
            if not loaded:
                if record is not None:
                    self.replica.put(key, record)
            elif (current.rank if current else None) != (record.rank if record else None):
                self.bus.report("bad_request", "cms/sites/ is written by the replicator", topic)
                self.counters.restored += 1
                self._materialize(key)
            return
        if place.owner == self.site:  # this site's own entry: what the broker holds is true
            if record is None:
                if current is not None:
                    self.replica.remove(key)
                    if loaded:
                        gone = current.tombstone(origin=self.site, at=time.time())
                        self._gone[key] = (time.monotonic(), gone)
                        self._push(key, place.rule)
            elif current is None or current.rank != record.rank:
                self.replica.put(key, record)
                self._gone.pop(key, None)
                if loaded:
                    self._push(key, place.rule)
            return
        # a shared key: the merge rule decides
        if record is None:
            if current is not None and not current.deleted and loaded:
                self.replica.put(key, current.tombstone(origin=self.site, at=time.time()))
                self._materialize(key)
                self._push(key, place.rule)
            return
        if (
            loaded
            and current is not None
            and current.deleted
            and record.rank < current.rank
            and record.updated_at > current.updated_at
        ):
            # written after the delete by a client that saw no key (`cms put` starts at v1):
            # a new life of the key, one version above its tombstone
            record = Record(current.version + 1, record.origin, record.updated_at, record.value)
        if self.replica.merge(key, record):
            self._materialize(key)
            if loaded:
                self._push(key, place.rule)
        elif loaded and current is not None and current.rank != record.rank:
            self.counters.restored += 1  # a stale write here: what the sites agree on goes back
            self._materialize(key)

    def _on_tombstone(self, topic: str, payload: bytes) -> None:
        """Tombstones come back from the broker's retained store when the replicator starts."""
        if self.loaded.is_set() or not payload:
            return
        try:
            body = parse_payload(Tombstone, payload, self.bus.settings.max_payload)
        except BadInput as exc:
            self.bus.report(exc.code, f"bad tombstone: {exc}", topic)
            return
        params = TOMBSTONE.match(topic)
        if params is None or params["key"] != body.key:
            self.bus.report("bad_schema", f"tombstone of {body.key} under {topic}", topic)
            return
        record = Record(body.version, body.origin, body.deleted_at, None, True)
        if record.expired(time.time(), self.ttl):
            return
        self._stored[body.key] = record.rank
        self.replica.merge(body.key, record)

    def _materialize(self, key: str) -> None:
        """Make the local broker hold what the replica holds for `key`."""
        if not self.loaded.is_set():
            return  # the end of loading does every key
        record = self.replica.get(key)
        if record is not None and record.expired(time.time(), self.ttl):
            self.replica.remove(key)
            record = None
        topic = self.keys.to_local(key)
        want = record.rank if record is not None and not record.deleted else None
        if self._actual.get(topic) != want:
            try:
                address = CMS_KEY.at(topic)
            except BadTopic:
                return
            if record is None or record.deleted:
                self._actual.pop(topic, None)
                self._write(address, None, echo=(topic, None))
            else:
                self._actual[topic] = record.rank
                entry = CmsEntry(
                    value=record.value,
                    version=record.version,
                    updated_at=record.updated_at,
                    origin=record.origin,
                )
                self._write(address, entry, echo=(topic, record.rank))
        if self.keys.owner(key) is None:
            stored = record.rank if record is not None and record.deleted else None
            if self._stored.get(key) != stored:
                self._store_tombstone(key, record if stored else None)

    def _store_tombstone(self, key: str, record: Record | None) -> None:
        address = TOMBSTONE.format(key=key)
        if record is None:
            self._stored.pop(key, None)
            self._write(address, None)
            return
        self._stored[key] = record.rank
        body = Tombstone(
            key=key, version=record.version, origin=record.origin, deleted_at=record.updated_at
        )
        self._write(address, body, expiry_s=max(1.0, record.updated_at + self.ttl - time.time()))

    def _write(
        self,
        address: Address[Any],
        body: Message | None,
        *,
        expiry_s: float | None = None,
        echo: tuple[str, Rank | None] | None = None,
    ) -> None:
        self._writes.append((address, body, expiry_s))
        self._echoes.append(echo)
        self._wake.set()

    async def _write_loop(self) -> None:
        """Local writes in order, each echo noted in the session it is published in."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._writes:
                address, body, expiry_s = self._writes.popleft()
                echo = self._echoes.popleft()
                await self.bus.connected.wait()
                if echo is not None:
                    self._expect_echo(echo)
                try:
                    await self.bus.publish(address, body, expiry_s=expiry_s)  # type: ignore[arg-type]
                except ConnectionLost as exc:  # the resync after reconnecting puts it right
                    log.warning("replicator.write_failed", topic=str(address), reason=str(exc))
                    continue
                self.counters.local_writes += 1

    def _expect_echo(self, echo: tuple[str, Rank | None]) -> None:
        self._new_session()
        self._echo[echo] += 1
        self._in_flight[echo[0]] += 1

    def _take_echo(self, topic: str, rank: Rank | None) -> bool:
        """Is this the broker handing back one of our own writes?"""
        self._new_session()
        token = (topic, rank)
        if self._echo[token] <= 0:
            return False
        self._echo[token] -= 1
        if not self._echo[token]:
            del self._echo[token]
        self._in_flight[topic] -= 1
        if not self._in_flight[topic]:
            del self._in_flight[topic]
        return True

    def _new_session(self) -> None:
        """Echoes of writes made in an earlier session never come: forget them."""
        if self._echo_session != self.bus.sessions:
            self._echo.clear()
            self._in_flight.clear()
            self._echo_session = self.bus.sessions

    # -- pushing this site's changes ---------------------------------------------------------

    def _push(self, key: str, rule: Rule | None) -> None:
        interval = rule.min_interval_s if rule is not None else 0.0
        if interval > 0:
            now = time.monotonic()
            wait = self._last_push.get(key, -math.inf) + interval - now
            if wait > 0:
                if key not in self._deferred:
                    self._deferred.add(key)
                    asyncio.get_running_loop().call_later(wait, self._push_deferred, key)
                return
            self._last_push[key] = now
        self.counters.local_changes += 1
        for link in self.links:
            link.offer(key)

    def _push_deferred(self, key: str) -> None:
        self._deferred.discard(key)
        self._last_push[key] = time.monotonic()
        self.counters.local_changes += 1
        for link in self.links:
            link.offer(key)

    def outgoing(self, key: str) -> dict[str, Any] | None:
        """The record of `key` as it goes out now (a deleted own entry: its delete)."""
        record = self.replica.get(key)
        if record is None and key in self._gone:
            record = self._gone[key][1]
        return None if record is None else _wire(key, record)

    # -- what peers send ----------------------------------------------------------------------

    def _on_changes(self, request: Request[ReplicaChanges]) -> None:
        body, sender = request.body, request.params["site"]
        if body.site != sender or sender == self.site:
            self.bus.report(
                "bad_request", f"changes from {body.site} on {request.topic}", request.topic
            )
            return
        if not self.loaded.is_set():
            return  # the first pull from that peer brings them
        self._apply(sender, body.records)

    def _apply(
        self,
        sender: str,
        records: Iterable[ReplicaRecord],
        expected: dict[str, Rank | None] | None = None,
    ) -> None:
        now = time.time()
        for wire in records:
            key = wire.key
            if not self.keys.accepts(key, sender):
                self.counters.refused += 1
                continue
            record = Record(wire.version, wire.origin, wire.updated_at, wire.value, wire.deleted)
            current = self.replica.get(key)
            if expected is not None and key in expected and _rank(current) != expected[key]:
                self.counters.stale += 1  # something newer came while we asked
                continue
            if self.keys.owner(key) is not None:  # the sender's own entry: its word is true
                if record.deleted:
                    if current is None:
                        self.counters.stale += 1
                        continue
                    self.replica.remove(key)
                elif current is not None and current.rank == record.rank:
                    self.counters.stale += 1
                    continue
                else:
                    self.replica.put(key, record)
            elif record.expired(now, self.ttl) or not self.replica.merge(key, record):
                self.counters.stale += 1
                continue
            self.counters.applied += 1
            self._materialize(key)

    async def _on_digest(self, request: Request[ReplicaDigest]) -> ReplicaVersions:
        body, sender = request.body, request.params["site"]
        self._check_peer(body.site, sender)
        if body.buckets != BUCKETS:
            raise BadInput(
                "bad_request", f"digest of {body.buckets} buckets; this site uses {BUCKETS}"
            )
        theirs = {}
        for group, digest in body.groups.items():
            buckets = None
            if digest.buckets is not None:
                if len(digest.buckets) != BUCKETS:
                    raise BadInput("bad_request", f"{group}: {len(digest.buckets)} buckets")
                buckets = tuple(int(b, 16) for b in digest.buckets)
            theirs[group] = (digest.count, int(digest.total, 16), buckets)
        if self._peer_sessions.get(sender) != body.session:
            self._peer_sessions[sender] = body.session  # it restarted or reconnected: pull back
            for link in self.links:
                if link.site in (sender, None):
                    link.want_pull(peer_restarted=True)
        self.counters.digests_served += 1

        def include(group: str) -> bool:  # shared keys, and this site's own entries
            owner = self.keys.owner(group)
            return owner is None or owner == self.site

        mine = self.replica.digest(include)
        pairs = differing(mine, theirs, [g for g in set(mine) | set(theirs) if include(g)])
        if body.after is not None:
            after = (body.after[0], body.after[1])
            pairs = [p for p in pairs if p > after]
        differ: dict[str, list[int]] = {}
        versions: list[tuple[str, int, str, bool, str]] = []
        size, nxt, last = 0, None, None
        grouped: dict[str, dict[int, list[tuple[str, Record]]]] = {}
        for group, bucket in pairs:
            if size > VERSIONS_BUDGET:
                nxt = last
                break
            differ.setdefault(group, []).append(bucket)
            if group not in grouped:
                grouped[group] = self.replica.by_bucket(group)
            for key, record in grouped[group].get(bucket, ()):
                version, origin, deleted, content = record.rank
                versions.append((key, version, origin, deleted, f"{content:x}"))
                size += len(key) + len(origin) + 48
            last = (group, bucket)
        return ReplicaVersions(site=self.site, differ=differ, versions=versions, next=nxt)

    async def _on_want(self, request: Request[ReplicaWant]) -> ReplicaChanges:
        body, sender = request.body, request.params["site"]
        self._check_peer(body.site, sender)
        self.counters.wants_served += 1
        records: list[dict[str, Any]] = []
        missing: list[str] = []
        size = 0
        for key in body.keys:
            owner = self.keys.owner(key)
            record = self.replica.get(key) if owner in (None, self.site) else None
            if record is None:
                missing.append(key)
                continue
            wire = _wire(key, record)
            size += len(key) + len(record.origin) + len(orjson.dumps(record.value)) + 96
            if records and size > WANT_BUDGET:
                break
            records.append(wire)
        self.counters.records_served += len(records)
        return ReplicaChanges(site=self.site, repair=True, records=records, missing=missing)

    def _check_peer(self, site: str, sender: str) -> None:
        if not self.loaded.is_set():
            raise BadInput("unavailable", f"{self.site} is still loading its CMS")
        if site != sender or sender == self.site:
            raise BadInput("bad_request", f"{site} writing as {sender} (this site: {self.site})")

    # -- computation across sites -------------------------------------------------------------

    async def _on_remote_task(self, request: Request[Task]) -> TaskResult | Rejected:
        """A task of this site's orchestrator for an agent of a neighbour site: sent on over
        the link to that site, its reply brought back."""
        site, agent = request.params["site"], request.params["agent"]
        link = next((link for link in self.links if link.site == site), None)
        if link is None or not link.connected:
            state = "no link" if link is None else "the link is down"
            raise BadInput("unavailable", f"site {site}: {state} (this site: {self.site})")
        return await link.forward(agent, request.body)

    # -- pulls (called by the links) ----------------------------------------------------------

    def pull_group(self, group: str, peer: str | None) -> bool:
        """Groups a pull from `peer` compares: shared keys and the peer's own entries (before
        its name is known: every other site's, which it ignores)."""
        owner = self.keys.owner(group)
        if owner is None:
            return True
        return owner != self.site and (peer is None or owner == peer)

    def plan(self, reply: ReplicaVersions) -> Plan:
        peer, plan = reply.site, Plan()
        theirs: dict[str, dict[str, Rank]] = collections.defaultdict(dict)
        for key, version, origin, deleted, content in reply.versions:
            theirs[group_of(key)][key] = (version, origin, deleted, int(content, 16))
        for group, buckets in reply.differ.items():
            owner = self.keys.owner(group)
            if owner is not None and owner != peer:
                continue
            valid = set(buckets)
            mine = dict(self.replica.in_buckets(group, valid))
            for key, rank in theirs.get(group, {}).items():
                if bucket_of(key) not in valid or not self.keys.accepts(key, peer):
                    continue
                held = mine.pop(key, None)
                held_rank = held.rank if held is not None else None
                if owner is None:
                    if held_rank is not None and rank <= held_rank:
                        continue
                elif held_rank == rank:
                    continue
                plan.wants.append(key)
                plan.expected[key] = held_rank
            if owner == peer:  # the peer's own entries it no longer has
                plan.drops += [(key, record.rank) for key, record in mine.items()]
        return plan

    def apply_pulled(
        self, peer: str, reply: ReplicaChanges, expected: dict[str, Rank | None]
    ) -> None:
        self._apply(peer, reply.records, expected)
        drops = []
        for key in reply.missing:
            held = self.replica.get(key)
            if self.keys.owner(key) == peer and held is not None:
                drops.append((key, held.rank))
        self.drop_owned(peer, [(k, r) for k, r in drops if expected.get(k) == r])

    def drop_owned(self, peer: str, drops: list[tuple[str, Rank]]) -> None:
        """Forget entries of `peer` that it no longer has (unless they changed meanwhile)."""
        for key, rank in drops:
            held = self.replica.get(key)
            if self.keys.owner(key) == peer and held is not None and held.rank == rank:
                self.replica.remove(key)
                self.counters.applied += 1
                self._materialize(key)

    # -- housekeeping -------------------------------------------------------------------------

    async def _sweep_loop(self, period_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            now = time.time()
            for key in self.replica.expire(now, self.ttl):
                self._stored.pop(key, None)  # the broker expires the retained one itself
            cutoff = time.monotonic() - GONE_KEEP_S
            for key in [k for k, (t, _) in self._gone.items() if t < cutoff]:
                del self._gone[key]
            for key in [k for k, t in self._last_push.items() if t < cutoff]:
                del self._last_push[key]

    async def _links_loop(self) -> None:
        """`cms/replication/peers/<site>` (local, not replicated): each link's state, which
        the orchestrators read (connected, rtt_ms) to send tasks to that site's workers."""
        while True:
            await asyncio.sleep(LINK_STATE_S)
            await self._publish_links()

    async def _publish_links(self) -> None:
        for link in self.links:
            if link.site is None:
                continue
            value = {
                "address": link.address,
                "connected": link.connected,
                "rtt_ms": link.rtt_ms,
                "pulls": link.pulls,
                "last_pull_at": link.last_pull_at,
                **dataclasses.asdict(link.counters),
            }
            if self._links_published.get(link.site) == value or not self.bus.connected.is_set():
                continue
            self._links_published[link.site] = value
            version = time.time_ns() // 1_000_000  # grows across restarts too
            await cms.put(self.bus, REPLICATION_PEER.format(site=link.site), value, version=version)

    async def settled(self, timeout: float = 60.0) -> None:
        """Wait until loaded, every link connected and pulled, and nothing is in flight (tests
        and benchmarks; it says nothing about what the peers have still to do)."""
        try:
            async with asyncio.timeout(timeout):
                while not self._settled():
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise TimeoutError(f"{self.site} not settled: {self.describe()}") from None

    def describe(self) -> dict[str, Any]:
        """Where this replicator stands (for logs and failures)."""
        return {
            "loaded": self.loaded.is_set(),
            "writes": len(self._writes),
            "deferred": len(self._deferred),
            "peers_seen": dict(self._peer_sessions),
            "links": [
                {
                    "peer": link.address,
                    "site": link.site,
                    "connected": link.connected,
                    "pulled": link.pulled_since_connect,
                    "pulls": link.pulls,
                    "pulling": link.pulling,
                    "idle": link.idle,
                }
                for link in self.links
            ],
        }

    def _settled(self) -> bool:
        if not self.loaded.is_set() or self._writes or self._deferred:
            return False
        return all(
            link.connected
            and link.pulled_since_connect
            and link.idle
            and link.site is not None
            and link.site in self._peer_sessions
            for link in self.links
        )

    async def sync_now(self, timeout: float = 60.0) -> None:
        """Pull from every peer now and wait until done."""
        before = {id(link): link.pulls for link in self.links}
        for link in self.links:
            link.want_pull()
        async with asyncio.timeout(timeout):
            while (
                not all(link.pulls > before[id(link)] and link.idle for link in self.links)
                or self._writes
            ):
                await asyncio.sleep(0.02)


def _rank(record: Record | None) -> Rank | None:
    return None if record is None else record.rank


def _wire(key: str, record: Record) -> dict[str, Any]:
    return {
        "key": key,
        "version": record.version,
        "origin": record.origin,
        "updated_at": record.updated_at,
        "deleted": record.deleted,
        "value": None if record.deleted else record.value,
    }
