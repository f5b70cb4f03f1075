"""A simulated sensor device: readings, window embeddings, and answers about its recent data.

Every tick it publishes one `Reading` per due stream on `data/<domain>/<stream>/<agent>` (QoS 0,
retained as the stream's last value); every `window_s` it publishes an `EmbeddingRecord` of
each stream's window on `data/<domain>/<stream>/embeddings/<agent>`; and it answers questions
about its own data on `knowledge/<domain>/sensors/<agent>` with a factual summary of the last
`history_s` seconds, numbers and alerts included, fit to paste into an SLM prompt.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from schemas import EmbeddingRecord, KnowledgeAnswer, KnowledgeQuery, Reading
from services.core.bus import Bus, Request
from services.core.topics import EMBEDDING, READING, SENSOR_ASK, Address, M, Topic
from services.data.features import (
    MODEL_DIMS,
    STATS_MODEL,
    Sample,
    describe,
    describe_agent,
    embed,
)
from services.data.streams import Stream
from services.sensor.simulator import Simulator, event_intensity

log = structlog.get_logger("edgecollab.sensor")


@dataclass(frozen=True, slots=True)
class EventSchedule:
    """When an event acts: from `after_s`, ramping over `ramp_s`, `for_s` long, every `every_s`."""

    event: str
    after_s: float = 0.0
    for_s: float = 0.0
    every_s: float = 0.0
    ramp_s: float = 10.0

    def intensity(self, elapsed_s: float) -> float:
        return event_intensity(
            elapsed_s,
            after_s=self.after_s,
            for_s=self.for_s,
            every_s=self.every_s,
            ramp_s=self.ramp_s,
        )


def data_topics(agent: str, domain: str, streams: list[Stream], *, embeddings: bool) -> list[str]:
    """The reading topics of `streams`, then (with `embeddings`) their embedding topics."""
    templates = (READING, EMBEDDING) if embeddings else (READING,)
    return [t.format(domain=domain, stream=s.name, agent=agent) for t in templates for s in streams]


class SensorAgent:
    """Samples its streams at `rate_hz`, publishes readings and embeddings, answers questions."""

    def __init__(
        self,
        *,
        bus: Bus,
        agent: str,
        domain: str,
        streams: list[Stream],
        rate_hz: float = 1.0,
        window_s: float = 30.0,
        history_s: float = 60.0,
        schedule: EventSchedule | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus, self.agent, self.domain, self.streams = bus, agent, domain, streams
        self.period_s = 1.0 / rate_hz
        self.window_s, self.history_s = window_s, history_s
        self.schedule, self.clock = schedule, clock
        self.simulator = Simulator(streams, seed=seed)
        self.history: dict[str, deque[Sample]] = {s.name: deque() for s in streams}
        self._window_end: dict[str, float] = {s.name: 0.0 for s in streams}
        self._started = clock()
        self.readings_sent = self.embeddings_sent = 0
        bus.serve(SENSOR_ASK, self.answer, domain=domain, agent=agent)

    def topics(self) -> list[str]:
        """The data topics this agent publishes (its card's `streams`)."""
        return data_topics(self.agent, self.domain, self.streams, embeddings=self.window_s > 0)

    def _topic(self, template: Topic[M], stream: Stream) -> Address[M]:
        return template.format(domain=self.domain, stream=stream.name, agent=self.agent)

    def intensity(self) -> float:
        """How strongly the configured event acts now."""
        return self.schedule.intensity(self.clock() - self._started) if self.schedule else 0.0

    async def run(self) -> None:
        """Tick at `rate_hz` on an absolute schedule; close a window every `window_s`."""
        loop = asyncio.get_running_loop()
        next_tick = next_window = loop.time()
        next_window += self.window_s
        while True:
            await self.bus.connected.wait()
            await self.tick()
            if self.window_s and loop.time() >= next_window:
                await self.close_window()
                next_window += self.window_s
            next_tick = max(next_tick + self.period_s, loop.time() - self.period_s)
            await asyncio.sleep(max(0.0, next_tick - loop.time()))

    async def tick(self) -> None:
        """Sample every due stream and publish its reading."""
        t = self.clock()
        event = self.schedule.event if self.schedule else None
        intensity = self.intensity()
        for stream in self.streams:
            if self.simulator.due(stream, t):
                value, text = self.simulator.sample(stream, t, event, intensity)
                await self._publish_reading(stream, t, value, text)

    async def _publish_reading(
        self, stream: Stream, t: float, value: float, text: str | None
    ) -> None:
        reading = Reading(
            agent=self.agent,
            domain=self.domain,
            stream=stream.name,
            value=value,
            text=text,
            unit=stream.unit,
            ts=t,
        )
        self._remember(stream.name, Sample(t, value, text))
        await self.bus.publish(self._topic(READING, stream), reading)
        self.readings_sent += 1

    def _remember(self, name: str, sample: Sample) -> None:
        history = self.history[name]
        history.append(sample)
        horizon = sample.ts - max(self.history_s, self.window_s)
        while history and history[0].ts < horizon:
            history.popleft()

    async def close_window(self) -> None:
        """Publish an embedding of each stream's samples since its previous window."""
        for stream in self.streams:
            record = self.window_record(stream)
            if record is None:
                continue
            self._window_end[stream.name] = record.window_end
            await self.bus.publish(self._topic(EMBEDDING, stream), record)
            self.embeddings_sent += 1

    def window_record(self, stream: Stream) -> EmbeddingRecord | None:
        """The EmbeddingRecord of the samples after the last closed window, if any."""
        samples = [s for s in self.history[stream.name] if s.ts > self._window_end[stream.name]]
        vector = embed(stream, samples)
        if vector is None:
            return None
        return EmbeddingRecord(
            agent=self.agent,
            domain=self.domain,
            stream=stream.name,
            model=STATS_MODEL,
            dim=MODEL_DIMS[STATS_MODEL],
            vector=vector,
            window_start=samples[0].ts,
            window_end=samples[-1].ts,
            summary=describe(stream, samples),
        )

    def summary(self) -> str:
        """Facts about the last `history_s` seconds of every stream."""
        horizon = self.clock() - self.history_s
        windows = [(s, [x for x in self.history[s.name] if x.ts >= horizon]) for s in self.streams]
        return describe_agent(self.agent, windows)

    async def answer(self, request: Request[KnowledgeQuery]) -> KnowledgeAnswer:
        """Answer a question about this domain with what the sensor measured recently."""
        started = time.perf_counter()
        query = request.body
        text = f"Sensor readings ({self.domain}) from {self.summary()}"
        log.info("knowledge.answered", request_id=query.request_id, asker=query.asker)
        return KnowledgeAnswer(
            request_id=query.request_id,
            agent=self.agent,
            domain=self.domain,
            answer=text,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
