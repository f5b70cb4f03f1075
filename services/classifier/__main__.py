"""`python -m services.classifier`: the Classifier Engine service."""

import asyncio
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from schemas import AgentCard, ModelInfo, now
from schemas.ids import AGENT_ID_PATTERN
from services.classifier.engine import ClassifierEngine
from services.classifier.head import HEADS_PATH, TRAIN_PATH, HeadsError
from services.classifier.service import Classifier
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.logging import configure_logging
from services.core.ownership import Accounts
from services.core.presence import Presence
from services.core.service import run_agent
from services.core.settings import MqttSettings, RuntimeSettings, service_settings


class ClassifierSettings(BaseSettings):
    """Classifier settings: EDGECOLLAB_CLASSIFIER_* or --kebab-case flags."""

    model_config = service_settings("classifier")

    agent_id: str = Field("classifier-1", pattern=AGENT_ID_PATTERN)
    model_dir: str = Field(
        "all-MiniLM-L6-v2",
        description="exported MiniLM folder (a name under EDGECOLLAB_MODELS_DIR)",
    )
    threads: int | None = Field(None, ge=1, description="onnxruntime threads (physical cores)")


def load_engine(
    settings: ClassifierSettings,
    runtime: RuntimeSettings,
    *,
    heads_path: Path = HEADS_PATH,
    train_path: Path = TRAIN_PATH,
) -> ClassifierEngine:
    """The engine, or exit with one line saying what is missing or stale and how to make it."""
    folder = runtime.model_dir(settings.model_dir)
    if not (folder / "model.onnx").is_file():
        sys.exit(
            f"classifier: no embedder at {folder}/model.onnx; "
            f"make it with: edgecollab export-model minilm {folder}"
        )
    try:
        return ClassifierEngine.load(
            folder, heads_path=heads_path, train_path=train_path, threads=settings.threads
        )
    except HeadsError as exc:
        sys.exit(f"classifier: {exc}")


async def serve(
    settings: ClassifierSettings,
    mqtt: MqttSettings,
    engine: ClassifierEngine,
    accounts: Accounts | None = None,
) -> None:
    def card(epoch: int) -> AgentCard:
        model = ModelInfo(name=engine.embedder.card.name)  # what it embeds with (computation/embed)
        return AgentCard(
            agent=settings.agent_id, kind="classifier", epoch=epoch, model=model, started_at=now()
        )

    def setup(bus: Bus, presence: Presence) -> None:
        Classifier(bus=bus, view=CmsView(bus, accounts=accounts), engine=engine)

    await run_agent(mqtt, agent=settings.agent_id, service="classifier", card=card, setup=setup)


def main() -> None:
    settings, runtime = ClassifierSettings(), RuntimeSettings()
    configure_logging("classifier", level=runtime.log_level)
    engine = load_engine(settings, runtime)
    accounts = Accounts.of_state_dir(runtime.state_dir)
    asyncio.run(serve(settings, MqttSettings(), engine, accounts))


if __name__ == "__main__":
    main()
