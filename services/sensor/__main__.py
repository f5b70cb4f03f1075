"""`python -m services.sensor`: one simulated sensor device (a wearable or a city sensor)."""

import asyncio
import zlib
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from schemas import AgentCard, now
from schemas.ids import AGENT_ID_PATTERN
from services.core.bus import Bus
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import Loop, run_agent
from services.core.settings import MqttSettings, RuntimeSettings, service_settings
from services.data.streams import EVENT_DOMAINS, PROFILES, STREAMS, Stream
from services.sensor.agent import EventSchedule, SensorAgent, data_topics


class SensorSettings(BaseSettings):
    """Sensor settings: EDGECOLLAB_SENSOR_* or --kebab-case flags."""

    model_config = service_settings("sensor")

    agent_id: str = Field("sensor-1", pattern=AGENT_ID_PATTERN)
    profile: Literal["wearable", "city"] = "wearable"
    streams: list[str] = Field([], description="a subset of the profile's streams (default: all)")
    rate_hz: float = Field(1.0, gt=0, le=200, description="ticks per second; one reading each")
    window_s: float = Field(30.0, ge=0, description="embedding window; 0: no embeddings")
    history_s: float = Field(60.0, gt=0, description="what a knowledge answer summarises")
    event: Literal["fever", "pollution", "crowd"] | None = None
    event_after_s: float = Field(0.0, ge=0, description="seconds after start the event begins")
    event_for_s: float = Field(0.0, ge=0, description="how long it lasts; 0: until stopped")
    event_every_s: float = Field(0.0, ge=0, description="repeat period; 0: once")
    event_ramp_s: float = Field(10.0, ge=0, description="seconds to reach full strength")
    seed: int | None = Field(None, description="noise seed (default: from the agent id)")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        domain, names = PROFILES[self.profile]
        unknown = sorted(set(self.streams) - set(names))
        if unknown:
            raise ValueError(f"{self.profile} has no streams {unknown}; it has {list(names)}")
        if self.event and EVENT_DOMAINS[self.event] != domain:
            raise ValueError(f"event {self.event} is for {EVENT_DOMAINS[self.event]} sensors")
        if self.event_every_s and not 0 < self.event_for_s < self.event_every_s:
            raise ValueError("a repeating event needs 0 < event-for-s < event-every-s")
        return self

    @property
    def domain(self) -> str:
        return PROFILES[self.profile][0]

    def stream_specs(self) -> list[Stream]:
        names = self.streams or PROFILES[self.profile][1]
        return [STREAMS[(self.domain, name)] for name in names]

    def schedule(self) -> EventSchedule | None:
        if self.event is None:
            return None
        return EventSchedule(
            self.event, self.event_after_s, self.event_for_s, self.event_every_s, self.event_ramp_s
        )


def build(settings: SensorSettings, bus: Bus) -> SensorAgent:
    """The agent a settings object describes, on `bus`."""
    return SensorAgent(
        bus=bus,
        agent=settings.agent_id,
        domain=settings.domain,
        streams=settings.stream_specs(),
        rate_hz=settings.rate_hz,
        window_s=settings.window_s,
        history_s=settings.history_s,
        schedule=settings.schedule(),
        seed=settings.seed if settings.seed is not None else zlib.crc32(settings.agent_id.encode()),
    )


async def serve(settings: SensorSettings, mqtt: MqttSettings) -> None:
    topics = data_topics(
        settings.agent_id,
        settings.domain,
        settings.stream_specs(),
        embeddings=settings.window_s > 0,
    )

    def card(epoch: int) -> AgentCard:
        return AgentCard(
            agent=settings.agent_id,
            kind="sensor",
            epoch=epoch,
            domains=[settings.domain],
            streams=topics,
            started_at=now(),
        )

    def setup(bus: Bus, presence: Presence) -> list[Loop]:
        return [build(settings, bus).run]

    await run_agent(mqtt, agent=settings.agent_id, service="sensor", card=card, setup=setup)


def main() -> None:
    settings = SensorSettings()
    configure_logging("sensor", level=RuntimeSettings().log_level)
    asyncio.run(serve(settings, MqttSettings()))


if __name__ == "__main__":
    main()
