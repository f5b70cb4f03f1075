"""`python -m services.worker`: one SLM worker (onnx or emulated backend)."""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import AgentCard, now
from schemas.ids import AGENT_ID_PATTERN
from services.core.bus import Bus
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import run_agent
from services.core.settings import MqttSettings
from services.worker.emulated import EmulatedBackend
from services.worker.service import Worker


class WorkerSettings(BaseSettings):
    """Worker settings: EDGECOLLAB_WORKER_* or --kebab-case flags."""

    model_config = SettingsConfigDict(
        env_prefix="EDGECOLLAB_WORKER_",
        cli_parse_args=True,
        cli_kebab_case=True,
        cli_prog_name="python -m services.worker",
        extra="ignore",
    )

    agent_id: str = Field("worker-1", pattern=AGENT_ID_PATTERN)
    backend: Literal["emulated"] = "emulated"
    tokens_per_s: float = Field(50.0, gt=0, description="emulated: batch-1 decode rate")
    concurrency: int = Field(4, ge=1, description="requests served at once; one more is rejected")
    batching_beta: float = Field(
        0.5, ge=0, le=1, description="emulated: k in flight decode k**beta x"
    )
    domains: list[str] = []


async def serve(settings: WorkerSettings, mqtt: MqttSettings) -> None:
    backend = EmulatedBackend(
        tokens_per_s=settings.tokens_per_s,
        concurrency=settings.concurrency,
        beta=settings.batching_beta,
    )

    def card(epoch: int) -> AgentCard:
        return AgentCard(
            agent=settings.agent_id,
            kind="worker",
            epoch=epoch,
            backend=backend.kind,
            model=backend.model,
            domains=settings.domains,
            tokens_per_s=backend.tokens_per_s,
            concurrency=backend.concurrency,
            batching_beta=settings.batching_beta,
            started_at=now(),
        )

    def setup(bus: Bus, presence: Presence) -> None:
        worker = Worker(bus=bus, agent=settings.agent_id, backend=backend, presence=presence)
        presence.load = worker.load

    await run_agent(mqtt, agent=settings.agent_id, service="worker", card=card, setup=setup)


def main() -> None:
    settings = WorkerSettings()
    configure_logging("worker")
    asyncio.run(serve(settings, MqttSettings()))


if __name__ == "__main__":
    main()
