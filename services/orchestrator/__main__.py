"""`python -m services.orchestrator`: the Task Orchestrator."""

import asyncio
import random

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

from schemas import AgentCard, now
from schemas.ids import AGENT_ID_PATTERN
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.logging import configure_logging
from services.core.ownership import Accounts
from services.core.presence import Presence
from services.core.service import Loop, run_agent
from services.core.settings import MqttSettings, RuntimeSettings, service_settings
from services.data.view import DataView
from services.orchestrator.allocator import Allocator, LiveKnowledge
from services.orchestrator.cloud import CloudSettings
from services.orchestrator.configs import OrchestratorConfigs
from services.orchestrator.cooperation import Cooperation
from services.orchestrator.dispatch import Dispatcher
from services.orchestrator.service import GAP_CONFIDENCE, Orchestrator
from services.orchestrator.tenants import Tenants
from services.scheduling.outcomes import Prices
from services.scheduling.policies import POLICIES, make_policy


class OrchestratorSettings(BaseSettings):
    """Orchestrator settings: EDGECOLLAB_ORCHESTRATOR_* or --kebab-case flags."""

    model_config = service_settings("orchestrator")

    agent_id: str = Field("orchestrator-1", pattern=AGENT_ID_PATTERN)
    policy: str = Field("earliest_finish", description=f"one of: {', '.join(POLICIES)}")
    policy_params: dict[str, float] = Field({}, description='e.g. {"deadline_s": 20}')
    seed: int | None = Field(None, description="random policies: a fixed seed")
    knowledge: LiveKnowledge = Field(
        "predicted",
        description="what the policy knows of output lengths: predicted (learned from finished "
        "answers per domain, difficulty and model) or max_tokens (the cap alone)",
    )
    cloud_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. .../v1")
    cloud_api_key: SecretStr | None = None
    cloud_model: str = "gpt-4"
    cloud_timeout_s: float = Field(30.0, gt=0)
    cloud_retries: int = Field(2, ge=0)
    cloud_usd_per_1m_input: float = Field(30.0, ge=0)
    cloud_usd_per_1m_output: float = Field(60.0, ge=0)
    metrics_interval_s: float = Field(5.0, gt=0)
    gap_confidence: float = Field(
        GAP_CONFIDENCE,
        ge=0,
        le=1,
        description="a plain answer whose first tokens' mean probability is below this asks "
        "the expert of its sub-label or domain (knowledge/<domain>/ask); 0: never, 1: always",
    )

    def cloud(self) -> CloudSettings | None:
        if not self.cloud_url:
            return None
        return CloudSettings(
            base_url=self.cloud_url,
            api_key=self.cloud_api_key,
            model=self.cloud_model,
            timeout_s=self.cloud_timeout_s,
            retries=self.cloud_retries,
            prices=Prices(
                usd_per_1m_input=self.cloud_usd_per_1m_input,
                usd_per_1m_output=self.cloud_usd_per_1m_output,
            ),
        )


async def serve(
    settings: OrchestratorSettings, mqtt: MqttSettings, accounts: Accounts | None = None
) -> None:
    policy = make_policy(settings.policy, **settings.policy_params)
    configs: OrchestratorConfigs | None = None

    def card(epoch: int) -> AgentCard:
        return AgentCard(
            agent=settings.agent_id, kind="orchestrator", epoch=epoch, started_at=now()
        )

    def setup(bus: Bus, presence: Presence) -> list[Loop]:
        nonlocal configs
        view = CmsView(bus, accounts=accounts)  # a device's card may not say "worker"
        allocator = Allocator(
            view, policy, rng=random.Random(settings.seed), knowledge=settings.knowledge
        )
        dispatcher = Dispatcher(bus=bus, view=view, allocator=allocator, cloud=None)
        configs = OrchestratorConfigs(
            bus, view, cloud=settings.cloud(),
            on_cloud=lambda cloud: setattr(dispatcher, "cloud", cloud),
            on_versions=allocator.refresh,
        )  # fmt: skip
        dispatcher.cloud, allocator.admits = configs.cloud(), configs.admits
        cooperation = Cooperation(bus=bus, view=view, data=DataView(bus))
        tenants = Tenants(bus, view, accounts=accounts, base_version=presence.base_version)
        orchestrator = Orchestrator(
            bus=bus, view=view, dispatcher=dispatcher, cooperation=cooperation,
            gap_confidence=settings.gap_confidence, tenants=tenants,
        )  # fmt: skip
        return [
            lambda: orchestrator.publish_metrics(
                base_version=presence.base_version, interval_s=settings.metrics_interval_s
            ),
            lambda: dispatcher.watch_silence(silent_after_s=mqtt.keepalive),
        ]

    try:
        await run_agent(
            mqtt, agent=settings.agent_id, service="orchestrator", card=card, setup=setup
        )
    finally:
        if configs is not None:
            await configs.aclose()


def main() -> None:
    settings, runtime = OrchestratorSettings(), RuntimeSettings()
    configure_logging("orchestrator", level=runtime.log_level)
    try:
        make_policy(settings.policy, **settings.policy_params)
    except ValueError as exc:
        raise SystemExit(f"orchestrator: {exc}") from None
    asyncio.run(serve(settings, MqttSettings(), Accounts.of_state_dir(runtime.state_dir)))


if __name__ == "__main__":
    main()
