"""`python -m services.worker`: one SLM worker (onnx or emulated backend)."""

import asyncio
import re
import sys
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings

from schemas import AgentCard, now
from schemas.ids import AGENT_ID_PATTERN, DOMAIN_PATTERN, VERSION_PATTERN
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import ConfigError
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import Loop, run_agent
from services.core.settings import MqttSettings, RuntimeSettings, service_settings
from services.worker.backend import Backend
from services.worker.emulated import EmulatedBackend
from services.worker.service import Worker


class WorkerSettings(BaseSettings):
    """Worker settings: EDGECOLLAB_WORKER_* or --kebab-case flags."""

    model_config = service_settings("worker")

    agent_id: str = Field("worker-1", pattern=AGENT_ID_PATTERN)
    backend: Literal["onnx", "emulated"] = "emulated"
    model_dir: str = Field(
        "SmolLM2-135M-Instruct", description="onnx: model folder (name under EDGECOLLAB_MODELS_DIR)"
    )
    model_version: str | None = Field(
        None,
        pattern=VERSION_PATTERN,
        description="onnx: the version this worker deploys (default: model.json's version), "
        "matched against cms/configs/<model>/version",
    )
    threads: int | None = Field(None, ge=1, description="onnx: intra-op threads (physical cores)")
    spinning: bool = Field(
        False,
        description="onnx: onnxruntime's threads spin between the ops of a step: faster on a box"
        " the worker has to itself, much slower next to a busy process",
    )
    tokens_per_s: float = Field(
        50.0, gt=0, allow_inf_nan=False, description="emulated: batch-1 decode rate"
    )
    concurrency: int = Field(4, ge=1, description="requests served at once; one more is rejected")
    batching_beta: float = Field(
        0.5, ge=0, le=1, description="emulated: k requests in flight decode k**beta times faster"
    )
    domains: list[str] = Field([], description='knowledge domains it answers, e.g. ["health"]')
    metrics_interval_s: float = Field(
        5.0, gt=0, description="how often cms/metrics/<agent>/... are written when they changed"
    )

    def make_backend(self, runtime: RuntimeSettings) -> Backend:
        if self.backend == "emulated":
            return EmulatedBackend(
                tokens_per_s=self.tokens_per_s,
                concurrency=self.concurrency,
                beta=self.batching_beta,
            )
        from services.worker.engine import Engine  # onnxruntime only where it is used
        from services.worker.onnx_backend import OnnxBackend

        engine = Engine.load(
            runtime.model_dir(self.model_dir), threads=self.threads, spinning=self.spinning
        )
        return OnnxBackend(engine, concurrency=self.concurrency, version=self.model_version)


async def serve(settings: WorkerSettings, mqtt: MqttSettings, backend: Backend) -> None:
    emulated = settings.backend == "emulated"

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
            batching_beta=settings.batching_beta if emulated else None,
            started_at=now(),
        )

    def setup(bus: Bus, presence: Presence) -> list[Loop]:
        worker = Worker(
            bus=bus,
            agent=settings.agent_id,
            backend=backend,
            view=CmsView(bus),
            presence=presence,
            domains=tuple(settings.domains),
        )
        presence.load = worker.load
        return [
            lambda: worker.publish_metrics(
                base_version=presence.base_version, interval_s=settings.metrics_interval_s
            )
        ]

    try:
        await run_agent(mqtt, agent=settings.agent_id, service="worker", card=card, setup=setup)
    finally:
        await backend.close()


def main() -> None:
    settings, runtime = WorkerSettings(), RuntimeSettings()
    configure_logging("worker", level=runtime.log_level)
    bad = [d for d in settings.domains if not re.match(DOMAIN_PATTERN, d)]
    if bad:
        sys.exit(f"worker: bad domain name(s) {bad}")
    try:
        backend = settings.make_backend(runtime)
    except ConfigError as exc:
        sys.exit(f"worker: {exc}")
    asyncio.run(serve(settings, MqttSettings(), backend))


if __name__ == "__main__":
    main()
