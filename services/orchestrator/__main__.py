"""`python -m services.orchestrator`: the Task Orchestrator."""

from __future__ import annotations

import asyncio

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import AgentCard, now
from schemas.ids import AGENT_ID_PATTERN
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import run_agent
from services.core.settings import MqttSettings
from services.orchestrator.service import Orchestrator


class OrchestratorSettings(BaseSettings):
    """Orchestrator settings: EDGECOLLAB_ORCHESTRATOR_* or --kebab-case flags."""

    model_config = SettingsConfigDict(
        env_prefix="EDGECOLLAB_ORCHESTRATOR_",
        cli_parse_args=True,
        cli_kebab_case=True,
        cli_prog_name="python -m services.orchestrator",
        extra="ignore",
    )

    agent_id: str = Field("orchestrator-1", pattern=AGENT_ID_PATTERN)


async def serve(settings: OrchestratorSettings, mqtt: MqttSettings) -> None:
    def card(epoch: int) -> AgentCard:
        return AgentCard(
            agent=settings.agent_id, kind="orchestrator", epoch=epoch, started_at=now()
        )

    def setup(bus: Bus, presence: Presence) -> None:
        Orchestrator(bus=bus, view=CmsView(bus))

    await run_agent(mqtt, agent=settings.agent_id, service="orchestrator", card=card, setup=setup)


def main() -> None:
    settings = OrchestratorSettings()
    configure_logging("orchestrator")
    asyncio.run(serve(settings, MqttSettings()))


if __name__ == "__main__":
    main()
