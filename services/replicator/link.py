"""One peer site: this replicator's own MQTT connection to the peer's broker.

Over it go tasks of this site's orchestrators for the peer's workers and their replies
(`forward`), a ping of the peer's broker every few seconds (`rtt_ms`: what a task sent there
pays on top), this site's changes as they happen (`replication/from/<this site>/changes`, in
batches), and this site's pulls: a digest of what it holds (`.../digest`, MQTT 5
request/response), the peer's versions of the keys in the buckets that differ, then a `want`
for the keys the peer has newer (`.../want`). A site only ever pulls what it lacks; the peer
pulls from it in turn (a digest with a new `session` tells the peer to), so after a partition
each side fetches exactly what differs and nothing crosses a link twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from schemas import (
    GroupDigest,
    Rejected,
    ReplicaChanges,
    ReplicaDigest,
    ReplicaVersions,
    ReplicaWant,
    Task,
    TaskResult,
)
from services.core.bus import Bus
from services.core.connection import ConnectionLost
from services.core.errors import (
    BadInput,
    DeadlineExceeded,
    EdgecollabError,
    PeerGone,
    RemoteError,
)
from services.core.settings import MqttSettings
from services.core.topics import REPLICA_CHANGES, REPLICA_DIGEST, REPLICA_WANT, TASKS
from services.replicator.merge import BUCKETS, SMALL_GROUP, GroupState

if TYPE_CHECKING:
    from services.replicator.service import Replicator

log = structlog.get_logger("edgecollab.replicator")

BATCH_BYTES = 96 * 1024  # a changes message stays well below the brokers' and peers' limits
BATCH_RECORDS = 1000
WANT_KEYS = 1000
PING_S = 5.0  # how often the round trip to the peer's broker is measured


@dataclass
class LinkCounters:
    """What crossed this link, counted in records (and messages for the live ones)."""

    live_records: int = 0  # this site's changes pushed to the peer
    live_messages: int = 0
    dropped_offline: int = 0  # changes not pushed while the link was down (a pull repairs)
    pulled_records: int = 0  # records fetched from the peer by digest repair
    pull_rounds: int = 0  # digest exchanges
    wants: int = 0  # want requests sent
    tasks: int = 0  # this site's tasks answered by the peer's workers (results and rejects)


class _PeerRestarted(Exception):
    """A digest the peer never saw was given up: it (re)started meanwhile."""


class PeerLink:
    """This site's connection to one peer's broker: live pushes out, pulls in."""

    def __init__(self, replicator: Replicator, settings: MqttSettings, *, timeout_s: float) -> None:
        self.replicator = replicator
        self.settings = settings
        self.site: str | None = None  # the peer's name, learned from its first answer
        self.bus = Bus(settings=settings, client_id=f"peer-{replicator.site}", service="replicator")
        self.bus.on_connect(self._on_connect)
        self.counters = LinkCounters()
        self.connections = 0
        self.pulls = 0  # completed since start
        self.pulled_since_connect = False
        self.pulling = False
        self.rtt_ms: float | None = None  # the latest round trip to the peer's broker
        self.last_pull_at: float | None = None
        self._timeout_s = timeout_s
        self._outbox: dict[str, None] = {}  # keys to push (their record is read when sent)
        self._ready = asyncio.Event()
        self._pull_wanted = asyncio.Event()
        self._ping_wanted = asyncio.Event()
        self._asking: asyncio.Task[Any] | None = None  # a digest still unanswered

    @property
    def address(self) -> str:
        return self.settings.address

    @property
    def connected(self) -> bool:
        return self.bus.connected.is_set()

    @property
    def idle(self) -> bool:
        return not (self._outbox or self.pulling or self._pull_wanted.is_set())

    async def run(self) -> None:
        await self.replicator.loaded.wait()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.bus.run())
            tasks.create_task(self._send_loop())
            tasks.create_task(self._pull_loop())
            tasks.create_task(self._ping_loop())

    async def _on_connect(self) -> None:
        self.connections += 1
        self.pulled_since_connect = False
        log.info("replicator.peer_connected", peer=self.address, site=self.site)
        self.want_pull()
        self._ping_wanted.set()

    async def _ping_loop(self) -> None:
        """`rtt_ms`: a publish to our own inbox at the peer's broker, until it comes back."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PING_S):
                    await self._ping_wanted.wait()
            self._ping_wanted.clear()
            if not self.connected:
                continue
            started = time.perf_counter()
            try:
                await self.bus.barrier(timeout=self._timeout_s)
            except (ConnectionLost, TimeoutError):
                continue
            self.rtt_ms = round((time.perf_counter() - started) * 1000, 2)

    # -- tasks for the peer's workers -----------------------------------------------------------

    async def forward(self, agent: str, task: Task) -> TaskResult | Rejected:
        """`task` for the peer's worker `agent`, as `computation/tasks/<agent>` at its broker;
        its reply, or BadInput saying why there is none (for the orchestrator that asked)."""
        where = f"site {self.site}"
        try:
            reply = await self.bus.request(
                TASKS.format(agent=agent), task, deadline=task.deadline, peer=agent
            )
        except RemoteError as exc:
            raise BadInput(exc.error.code, f"{where}: {exc.error.message}") from None
        except PeerGone as exc:  # nobody subscribed there (no such worker), or the link fell
            raise BadInput("unavailable", f"{where}: {exc}") from None
        except DeadlineExceeded as exc:
            raise BadInput("deadline", f"{where}: {exc}") from None
        if not isinstance(reply, TaskResult | Rejected):
            raise BadInput("bad_schema", f"{where}: {agent} answered {reply!r:.200}")
        self.counters.tasks += 1
        return reply

    # -- live pushes --------------------------------------------------------------------------

    def offer(self, key: str) -> None:
        """Push `key`'s current record soon; dropped while the link is down (the peer pulls
        what it lacks when it is back)."""
        if not self.connected:
            self.counters.dropped_offline += 1
            return
        self._outbox[key] = None
        self._ready.set()

    async def _send_loop(self) -> None:
        site = self.replicator.site
        while True:
            await self._ready.wait()
            self._ready.clear()
            await asyncio.sleep(0)  # let a burst of changes gather into one message
            while self._outbox:
                if not self.connected:
                    self.counters.dropped_offline += len(self._outbox)
                    self._outbox.clear()
                    break
                records = self._take_batch()
                if not records:
                    continue
                body = ReplicaChanges(site=site, records=records)
                try:
                    await self.bus.publish(REPLICA_CHANGES.format(site=site), body)
                except ConnectionLost as exc:
                    log.warning("replicator.push_failed", peer=self.address, reason=str(exc))
                    continue
                self.counters.live_records += len(records)
                self.counters.live_messages += 1

    def _take_batch(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        size = 0
        while self._outbox and len(records) < BATCH_RECORDS:
            key = next(iter(self._outbox))
            wire = self.replicator.outgoing(key)
            length = len(orjson.dumps(wire)) if wire is not None else 0
            if records and size + length > BATCH_BYTES:
                break
            del self._outbox[key]
            if wire is not None:
                records.append(wire)
                size += length
        return records

    # -- pulls (anti-entropy) -------------------------------------------------------------------

    def want_pull(self, *, peer_restarted: bool = False) -> None:
        """Pull soon; when the peer has just (re)started, a digest it never saw (sent before
        it subscribed) is given up at once instead of at its timeout."""
        self._pull_wanted.set()
        if peer_restarted and self._asking is not None and not self._asking.done():
            self._asking.cancel()

    async def _pull_loop(self) -> None:
        period = self.replicator.anti_entropy_s
        backoff = 0.5
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period * random.uniform(0.8, 1.2)):
                    await self._pull_wanted.wait()
            self._pull_wanted.clear()
            if not self.connected:
                continue  # the next connection asks for a pull
            self.pulling = True
            try:
                async with self.replicator.pull_lock:  # one pull at a time: no entry twice
                    await self._pull()
                backoff = 0.5
            except _PeerRestarted:
                log.info("replicator.peer_restarted", peer=self.address, site=self.site)
            except (EdgecollabError, ConnectionLost, TimeoutError) as exc:
                log.warning("replicator.pull_failed", peer=self.address, reason=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, period)
                self._pull_wanted.set()
            finally:
                self.pulling = False

    async def _pull(self) -> None:
        replicator, site = self.replicator, self.replicator.site
        session = f"{replicator.run_id}.{self.connections}"
        after: tuple[str, int] | None = None
        while True:
            groups = replicator.replica.digest(lambda g: replicator.pull_group(g, self.site))
            digest = ReplicaDigest(
                site=site, session=session, buckets=BUCKETS, groups=_wire(groups), after=after
            )
            self._asking = asyncio.ensure_future(
                self.bus.request(
                    REPLICA_DIGEST.format(site=site), digest, deadline=time.time() + self._timeout_s
                )
            )
            try:
                reply = await self._asking
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # we are being stopped
                raise _PeerRestarted from None
            finally:
                self._asking = None
            self.counters.pull_rounds += 1
            if not isinstance(reply, ReplicaVersions) or reply.site == site:
                raise BadInput(
                    "bad_schema", f"{self.address} answered a digest with {reply!r:.200}"
                )
            if self.site not in (None, reply.site):
                log.warning("replicator.peer_renamed", peer=self.address, was=self.site)
            self.site = reply.site
            plan = replicator.plan(reply)
            await self._fetch(plan.wants, plan.expected)
            replicator.drop_owned(reply.site, plan.drops)
            if reply.next is None:
                break
            after = reply.next
        self.pulls += 1
        self.pulled_since_connect = True
        self.last_pull_at = time.time()

    async def _fetch(self, keys: list[str], expected: dict[str, Any]) -> None:
        """Ask for `keys` until each came back or was reported missing."""
        replicator, site = self.replicator, self.replicator.site
        assert self.site is not None
        while keys:
            chunk = keys[:WANT_KEYS]
            want = ReplicaWant(site=site, keys=chunk)
            reply = await self.bus.request(
                REPLICA_WANT.format(site=site), want, deadline=time.time() + self._timeout_s
            )
            self.counters.wants += 1
            if not isinstance(reply, ReplicaChanges) or reply.site != self.site:
                raise BadInput("bad_schema", f"{self.address} answered a want with {reply!r:.200}")
            replicator.apply_pulled(self.site, reply, expected)
            self.counters.pulled_records += len(reply.records)
            answered = {r.key for r in reply.records} | set(reply.missing)
            if not answered & set(chunk):
                raise BadInput("bad_schema", f"{self.address} answered none of {len(chunk)} keys")
            keys = [k for k in keys if k not in answered]


def _wire(groups: dict[str, GroupState]) -> dict[str, GroupDigest]:
    return {
        group: GroupDigest(
            count=state.count,
            total=f"{state.total:x}",
            buckets=[f"{b:x}" for b in state.buckets] if state.count > SMALL_GROUP else None,
        )
        for group, state in groups.items()
    }
