"""`python -m services.sandbox`: the sandboxed calculator peer (knowledge/arithmetic/run)."""

import asyncio
import sys

from pydantic import Field
from pydantic_settings import BaseSettings

from schemas import AgentCard, now
from schemas.ids import AGENT_ID_PATTERN
from services.core.bus import Bus
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import run_agent
from services.core.settings import MqttSettings, RuntimeSettings, service_settings
from services.sandbox.runner import NOBODY, Limits, Sandbox
from services.sandbox.service import SandboxPeer


class SandboxSettings(BaseSettings):
    """Sandbox settings: EDGECOLLAB_SANDBOX_* or --kebab-case flags."""

    model_config = service_settings("sandbox")

    agent_id: str = Field("sandbox-1", pattern=AGENT_ID_PATTERN)
    concurrency: int = Field(2, ge=1, le=64, description="programs run at once")
    python: str | None = Field(
        None, description="interpreter for programs (default: the first that runs confined)"
    )
    user: int = Field(NOBODY, ge=1, description="uid and gid programs run as, when started as root")
    network_namespace: bool = Field(True, description="a new empty network namespace when allowed")
    max_program_bytes: int = Field(16384, ge=64, le=65536, description="longer ones are refused")
    timeout_s: float = Field(5.0, gt=0, le=60, description="wall clock per program, at most")
    cpu_s: int = Field(5, ge=1, le=60, description="CPU seconds per program (RLIMIT_CPU)")
    memory_mb: int = Field(512, ge=64, description="address space per program (RLIMIT_AS)")
    file_kb: int = Field(1024, ge=0, description="largest file a program may write (RLIMIT_FSIZE)")
    output_kb: int = Field(64, ge=1, le=1024, description="stdout read; past it: killed")

    def limits(self) -> Limits:
        return Limits(
            wall_s=self.timeout_s,
            cpu_s=self.cpu_s,
            memory_bytes=self.memory_mb * 2**20,
            file_bytes=self.file_kb * 2**10,
            output_bytes=self.output_kb * 2**10,
        )


async def serve(settings: SandboxSettings, mqtt: MqttSettings, sandbox: Sandbox) -> None:
    def card(epoch: int) -> AgentCard:
        return AgentCard(
            agent=settings.agent_id,
            kind="sandbox",
            epoch=epoch,
            backend="python",
            domains=["arithmetic"],
            concurrency=settings.concurrency,
            started_at=now(),
        )

    def setup(bus: Bus, presence: Presence) -> None:
        peer = SandboxPeer(
            bus=bus,
            agent=settings.agent_id,
            sandbox=sandbox,
            limits=settings.limits(),
            concurrency=settings.concurrency,
            max_program_bytes=settings.max_program_bytes,
            presence=presence,
        )
        presence.load = peer.load

    await run_agent(mqtt, agent=settings.agent_id, service="sandbox", card=card, setup=setup)


def main() -> None:
    settings = SandboxSettings()
    configure_logging("sandbox", level=RuntimeSettings().log_level)
    try:
        sandbox = asyncio.run(
            Sandbox.detect(settings.python, user=settings.user, netns=settings.network_namespace)
        )
    except RuntimeError as exc:
        sys.exit(f"sandbox: {exc}")
    asyncio.run(serve(settings, MqttSettings(), sandbox))


if __name__ == "__main__":
    main()
