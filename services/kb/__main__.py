"""`python -m services.kb`: a knowledge base per domain (knowledge/<domain>/retrieve)."""

import asyncio
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from schemas import AgentCard, ModelInfo, now
from schemas.ids import AGENT_ID_PATTERN, Domain
from services.core.bus import Bus
from services.core.embedder import Embedder
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import Loop, run_agent
from services.core.settings import MqttSettings, RuntimeSettings, service_settings
from services.kb.documents import DocumentError
from services.kb.index import Document, Index
from services.kb.service import KnowledgeBase, shipped


class KbSettings(BaseSettings):
    """Knowledge-base settings: EDGECOLLAB_KB_* or --kebab-case flags."""

    model_config = service_settings("kb")

    agent_id: str = Field("kb-1", pattern=AGENT_ID_PATTERN)
    model_dir: str = Field(
        "all-MiniLM-L6-v2", description="exported MiniLM (a name under EDGECOLLAB_MODELS_DIR)"
    )
    domains: list[Domain] = Field(
        ["health", "environment"], min_length=1, description="the domains it holds"
    )
    index_dir: Path | None = Field(
        None, description="where the index is kept (default: <EDGECOLLAB_STATE_DIR>/kb/<agent>)"
    )
    threads: int | None = Field(None, ge=1, description="onnxruntime threads")


async def serve(
    settings: KbSettings,
    mqtt: MqttSettings,
    embedder: Embedder,
    folder: Path,
    seed: list[Document],
) -> None:
    index, stale = Index.load(folder, embedder.card.name, embedder.dims)
    todo = stale + [d for d in seed if not index.has(d.domain, d.name, d.sha256)]

    def card(epoch: int) -> AgentCard:
        return AgentCard(
            agent=settings.agent_id,
            kind="kb",
            epoch=epoch,
            model=ModelInfo(name=embedder.card.name),
            domains=settings.domains,
            started_at=now(),
        )

    def setup(bus: Bus, presence: Presence) -> list[Loop]:
        kb = KnowledgeBase(
            bus=bus, agent=settings.agent_id, embedder=embedder, index=index, folder=folder,
            domains=settings.domains, base_version=presence.base_version,
        )  # fmt: skip

        async def jobs() -> None:
            if todo:
                await kb.submit(todo)
            await kb.run_jobs()

        return [jobs]

    await run_agent(mqtt, agent=settings.agent_id, service="kb", card=card, setup=setup)


def main() -> None:
    settings, runtime = KbSettings(), RuntimeSettings()
    configure_logging("kb", level=runtime.log_level)
    model = runtime.model_dir(settings.model_dir)
    if not (model / "model.onnx").is_file():
        sys.exit(f"kb: no embedder at {model}/model.onnx; make it with: edgecollab export-model "
                 f"minilm {model}")  # fmt: skip
    folder = settings.index_dir or runtime.state_dir / "kb" / settings.agent_id
    try:
        seed = shipped(settings.domains)
    except DocumentError as exc:
        sys.exit(f"kb: the shipped documents: {exc}")
    embedder = Embedder.load(model, threads=settings.threads)
    asyncio.run(serve(settings, MqttSettings(), embedder, folder, seed))


if __name__ == "__main__":
    main()
