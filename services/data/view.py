"""Data cooperation, the consuming side: a validated local view of `data/...`.

    view = DataView(bus, domains=["health"])  # before bus.run(): it adds a route
    view.summary("health")            # str: a line of numbers and alerts per agent, for a prompt
    view.embedding("wearable-1", "heart_rate")  # EmbeddingRecord | None of the recent window
    view.agents("health")             # agents with readings in the last `history_s`
    view.live("health", within_s=60)  # agents heard publishing (not retained) in the last 60 s
    view.facts("health", agents=["watch-7"])  # list[Fact]: each stream's window, for an answer
    view.last_seen("wearable-1")      # float | None: when its newest reading arrived (our clock)
    view.window("wearable-1", "spo2") # list[Sample]: the readings kept, oldest first
    view.counters                     # DataCounters: readings, refused, embeddings_reused, ...

`embedding()` returns the window embedding the sensor published when it is fresh (counted in
`embeddings_reused`), else computes stats-v1 here from the readings (`embeddings_computed`).
`bytes_received_embeddings` counts the published embeddings taken; `bytes_raw_equivalent` the
readings of their windows, i.e. what shipping the raw data instead would have cost (only
readings this view saw are counted).

Beyond the schema, a reading must be on its own topic (topic levels = payload fields), of a
registered stream, in the stream's unit (or a listed spelling), within its physical bounds,
and not from the future; an embedding must be of a registered stream and a known model, with
the dimensionality that model declares. Anything else is refused with an `Error` on
`errors/<service>` naming the stream and what was expected, and the view goes on.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from schemas import EmbeddingRecord, Fact, Reading
from schemas.messages import ErrorCode
from services.core.bus import Bus
from services.core.changes import Changes
from services.core.connection import ConnectionLost
from services.core.errors import BadInput, EdgecollabError
from services.core.topics import EMBEDDING, READING
from services.core.wire import parse_payload
from services.data.features import (
    MODEL_DIMS,
    STATS_MODEL,
    Sample,
    describe,
    describe_agent,
    embed,
)
from services.data.grounding import fact
from services.data.streams import STREAMS, Stream, lookup

M = TypeVar("M", Reading, EmbeddingRecord)
log = structlog.get_logger("edgecollab.data")

DEVICE_FRESH_S = 60.0  # a device without a card is live while heard this recently (`live`)
_MAX_CLOCK_AHEAD_S = 300.0  # a reading further in the future than this has a broken clock
_ORDER = {key: index for index, key in enumerate(STREAMS)}
# Python's json and others write NaN/Infinity bare, which is not JSON: say so, not just "bad char"
_NON_FINITE = re.compile(rb"[:\[,]\s*-?(NaN|Infinity)\b")
_NON_FINITE_HINT = " (NaN and Infinity are not JSON numbers: a reading must be finite)"


@dataclass(slots=True)
class _Series:
    """What the view keeps of one (agent, stream)."""

    stream: Stream
    samples: deque[Sample]
    embedding: EmbeddingRecord | None = None


@dataclass(slots=True)
class DataCounters:
    """What a DataView took, refused, reused and computed (`dataclasses.asdict` for JSON)."""

    readings: int = 0
    embeddings: int = 0  # published embeddings taken
    refused: int = 0
    out_of_order: int = 0  # readings not newer than the last one of their stream (dropped)
    embeddings_reused: int = 0
    embeddings_computed: int = 0
    bytes_received_readings: int = 0
    bytes_received_embeddings: int = 0
    bytes_raw_equivalent: int = 0


def _registry_order(item: tuple[tuple[str, str], _Series]) -> tuple[str, int]:
    """Agents in name order, each agent's streams in registry order."""
    (agent, _), series = item
    return agent, _ORDER[series.stream.key]


def _topic_mismatch(params: dict[str, str], body: Reading | EmbeddingRecord) -> str | None:
    for name in ("domain", "stream", "agent"):
        if params[name] != getattr(body, name):
            return f"topic says {name} {params[name]!r}, payload says {getattr(body, name)!r}"
    return None


def _unknown_stream(domain: str, name: str) -> str:
    known = sorted(s for d, s in STREAMS if d == domain)
    if known:
        return f"unknown stream {domain}/{name}; {domain} has {known}"
    return f"unknown data domain {domain!r}; known: {sorted({d for d, _ in STREAMS})}"


def reading_problem(reading: Reading, params: dict[str, str], now: float) -> str | None:
    """Why a schema-valid reading is refused, or None when it is fine."""
    stream = lookup(reading.domain, reading.stream)
    if (mismatch := _topic_mismatch(params, reading)) or stream is None:
        return mismatch or _unknown_stream(reading.domain, reading.stream)
    where = f"stream {stream.domain}/{stream.name}"
    if not stream.accepts_unit(reading.unit):
        also = f" (or {', '.join(map(repr, stream.aliases))})" if stream.aliases else ""
        return f"{where} expects unit {stream.unit!r}{also}, got {reading.unit!r}"
    if reading.value is None:
        return None if stream.captions and reading.text else f"{where} needs a numeric value"
    if not stream.in_bounds(reading.value):
        lo, hi = stream.bounds
        return f"{where}: {reading.value} {stream.unit} is outside the physical bounds {lo}-{hi}"
    if reading.ts > now + _MAX_CLOCK_AHEAD_S:
        return f"{where}: timestamp {reading.ts} is {reading.ts - now:.0f} s in the future"
    return None


def embedding_problem(record: EmbeddingRecord, params: dict[str, str]) -> str | None:
    """Why a schema-valid embedding record is refused, or None when it is fine."""
    if mismatch := _topic_mismatch(params, record):
        return mismatch
    if lookup(record.domain, record.stream) is None:
        return _unknown_stream(record.domain, record.stream)
    dim = MODEL_DIMS.get(record.model)
    if dim is None:
        return f"unknown embedding model {record.model!r}; known: {sorted(MODEL_DIMS)}"
    if record.dim != dim:
        return f"model {record.model} declares {dim} dimensions, the record has dim {record.dim}"
    if record.window_end < record.window_start:
        return "window_end is before window_start"
    return None


class DataView:
    """Readings and embeddings of `data/...` (some domains or all), validated and windowed."""

    def __init__(
        self,
        bus: Bus,
        *,
        domains: Iterable[str] | None = None,
        history_s: float = 120.0,
        window_s: float = 30.0,
        max_samples: int = 2000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bus, self.history_s, self.window_s = bus, history_s, window_s
        self._max_samples, self._clock = max_samples, clock
        self._series: dict[tuple[str, str], _Series] = {}
        self._last_seen: dict[str, float] = {}
        self._heard: dict[tuple[str, str], float] = {}  # (agent, domain) -> last live arrival
        self._listening = False  # past the retained last values sent at (re)subscription
        self.counters = DataCounters()
        self.changes = Changes()  # notified at each accepted reading
        # One subscription per domain covers readings and embeddings: two overlapping ones
        # (READING's and EMBEDDING's filters) make mosquitto deliver every embedding twice.
        # ('#' also matches the parent level, so data/<domain>/+/+/# takes readings too.)
        filters = [READING.filter(domain=d) for d in domains] if domains else [READING.filter()]
        for topic_filter in filters:
            bus.listen_raw(topic_filter + "/#", self._on_message)
        bus.on_connect(self._resubscribed)

    async def _resubscribed(self) -> None:
        """After each (re)connection the broker first sends the retained last values, which
        may be a long-dead device's; readings after them are heard live (see `live`). Waited
        for before the agent's birth (presence attaches after its views), so a reading sent
        once the agent is seen online is heard live."""
        self._listening = False
        try:
            await self._bus.barrier()
        except (EdgecollabError, ConnectionLost, TimeoutError) as exc:  # the next one syncs
            log.info("data.sync_failed", error=str(exc))
        finally:
            self._listening = True

    # -- what the view offers ------------------------------------------------------------------

    def agents(self, domain: str) -> list[str]:
        """Agents with readings of `domain` in the last `history_s`."""
        horizon = self._clock() - self.history_s
        return sorted(
            {
                agent
                for (agent, _), series in self._series.items()
                if series.stream.domain == domain and series.samples
                if series.samples[-1].ts >= horizon
            }
        )

    @property
    def listening(self) -> bool:
        """Past the retained last values of this connection: what arrives now is live."""
        return self._listening

    def live(self, domain: str, *, within_s: float) -> list[str]:
        """Agents heard publishing readings of `domain` in the last `within_s` (our clock):
        readings that arrived while the view listened, not retained last values from before
        it subscribed (a device that stopped long ago still has its last value retained)."""
        horizon = self._clock() - within_s
        return sorted(a for (a, d), at in self._heard.items() if d == domain and at >= horizon)

    def facts(self, domain: str, *, agents: Iterable[str] | None = None) -> list[Fact]:
        """One `Fact` per stream of `domain` with values in the last `history_s`, per agent
        in name order, streams in registry order."""
        windows = self._windows(domain, agents)
        return [f for agent, parts in windows.items() for s, w in parts if (f := fact(agent, s, w))]

    def last_seen(self, agent: str) -> float | None:
        """Local wall-clock time the agent's newest valid reading arrived (None: never).

        Arrival time, not the reading's `ts`, so a device's clock skew cannot fake freshness.
        """
        return self._last_seen.get(agent)

    def window(self, agent: str, stream: str) -> list[Sample]:
        """The samples of (agent, stream) in the last `history_s` of its readings, oldest first."""
        series = self._series.get((agent, stream))
        return list(series.samples) if series else []

    def summary(self, domain: str, *, agents: Iterable[str] | None = None) -> str:
        """One line per agent: each stream's last value, mean, range, trend, and alerts."""
        windows = self._windows(domain, agents)
        if not windows:
            return f"No {domain} readings in the last {self.history_s:.0f} s."
        return "\n".join(describe_agent(agent, parts) for agent, parts in windows.items())

    def _windows(
        self, domain: str, agents: Iterable[str] | None
    ) -> dict[str, list[tuple[Stream, list[Sample]]]]:
        wanted = set(agents) if agents is not None else None
        horizon = self._clock() - self.history_s
        windows: dict[str, list[tuple[Stream, list[Sample]]]] = defaultdict(list)
        for (agent, _), series in sorted(self._series.items(), key=_registry_order):
            if series.stream.domain != domain or (wanted is not None and agent not in wanted):
                continue
            recent = [s for s in series.samples if s.ts >= horizon]
            if recent:
                windows[agent].append((series.stream, recent))
        return windows

    def embedding(self, agent: str, stream: str) -> EmbeddingRecord | None:
        """The recent window's embedding: the published one when fresh, else computed here."""
        series = self._series.get((agent, stream))
        if series is None:
            return None
        record = series.embedding
        if record is not None and self._fresh(series, record):
            self.counters.embeddings_reused += 1
            return record
        record = self._compute(agent, series)
        if record is not None:
            self.counters.embeddings_computed += 1
        return record

    @staticmethod
    def _fresh(series: _Series, record: EmbeddingRecord) -> bool:
        """Fewer than two windows' worth of readings arrived after the record's window."""
        inside = after = 0
        for sample in series.samples:
            if sample.ts > record.window_end:
                after += 1
            elif sample.ts >= record.window_start:
                inside += 1
        return after < 2 * max(inside, 1)

    def _compute(self, agent: str, series: _Series) -> EmbeddingRecord | None:
        if not series.samples:
            return None
        start = series.samples[-1].ts - self.window_s
        samples = [s for s in series.samples if s.ts >= start]
        vector = embed(series.stream, samples)
        if vector is None:
            return None
        return EmbeddingRecord(
            agent=agent,
            domain=series.stream.domain,
            stream=series.stream.name,
            model=STATS_MODEL,
            dim=len(vector),
            vector=vector,
            window_start=samples[0].ts,
            window_end=samples[-1].ts,
            summary=describe(series.stream, samples),
        )

    # -- receiving -----------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        if not payload:  # a retained last value being cleared
            return
        if (params := EMBEDDING.match(topic)) is not None:
            self._take(topic, payload, params, EmbeddingRecord, self._on_embedding)
        elif (params := READING.match(topic)) is not None:
            self._take(topic, payload, params, Reading, self._on_reading)
        else:
            self._refuse("unknown_topic", f"no such data topic: {topic}", topic)

    def _take(
        self,
        topic: str,
        payload: bytes,
        params: dict[str, str],
        model: type[M],
        handler: Callable[[str, dict[str, str], M, int], None],
    ) -> None:
        try:
            body = parse_payload(model, payload, self._bus.settings.max_payload)
        except BadInput as exc:
            hint = (
                _NON_FINITE_HINT if exc.code == "bad_json" and _NON_FINITE.search(payload) else ""
            )
            self._refuse(exc.code, str(exc) + hint, topic)
            return
        handler(topic, params, body, len(payload))

    def _on_reading(self, topic: str, params: dict[str, str], body: Reading, size: int) -> None:
        problem = reading_problem(body, params, self._clock())
        if problem:
            self._refuse("bad_request", problem, topic)
            return
        series = self._get_series(body.agent, body.domain, body.stream)
        if series.samples and body.ts <= series.samples[-1].ts:
            self.counters.out_of_order += 1  # e.g. a retained last value we already have
            return
        series.samples.append(Sample(body.ts, body.value, body.text, size))
        self._last_seen[body.agent] = self._clock()
        if self._listening:
            self._heard[(body.agent, body.domain)] = self._clock()
        while series.samples[0].ts < body.ts - self.history_s:
            series.samples.popleft()
        self.counters.readings += 1
        self.counters.bytes_received_readings += size
        self.changes.notify()

    def _on_embedding(
        self, topic: str, params: dict[str, str], body: EmbeddingRecord, size: int
    ) -> None:
        problem = embedding_problem(body, params)
        if problem:
            self._refuse("bad_request", problem, topic)
            return
        series = self._get_series(body.agent, body.domain, body.stream)
        series.embedding = body
        raw = sum(s.nbytes for s in series.samples if body.window_start <= s.ts <= body.window_end)
        self.counters.embeddings += 1
        self.counters.bytes_received_embeddings += size
        self.counters.bytes_raw_equivalent += raw

    def _get_series(self, agent: str, domain: str, name: str) -> _Series:
        series = self._series.get((agent, name))
        if series is None:
            stream = lookup(domain, name)
            assert stream is not None  # validated before
            series = self._series[(agent, name)] = _Series(stream, deque(maxlen=self._max_samples))
        return series

    def _refuse(self, code: ErrorCode, message: str, topic: str) -> None:
        """Count, log and report on errors/<service> (the bus logs it)."""
        self.counters.refused += 1
        self._bus.report(code, message, topic)
