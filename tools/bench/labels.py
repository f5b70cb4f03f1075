"""A stand-in Classifier Engine for `bench fig6`: it answers computation/classify with the
domain and difficulty the trace gave the request, which the bench writes into the query text
as the word `label@<domain>/<difficulty>`.

The real classifier (MiniLM embeddings and heads) would infer them from the text; a trace has
no text, so its labels stand for the classifier's, as in the simulator. Run as
`python -m tools.bench.labels AGENT_ID` (the broker from EDGECOLLAB_MQTT_*).
"""

from __future__ import annotations

import asyncio
import re
import sys

from schemas import AgentCard, Classification, ClassifyRequest, Complexity, now
from services.classifier.complexity import expected_tokens
from services.core.bus import Bus, Request
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import run_agent
from services.core.settings import MqttSettings
from services.core.topics import CLASSIFY

_LABEL = re.compile(r"(?<!\S)label@([a-z][a-z0-9_-]{0,31})/(easy|medium|hard)(?!\S)")


def label_word(domain: str, difficulty: str | None) -> str:
    """The query word that carries a trace line's labels ("" when it has no difficulty)."""
    return f"label@{domain}/{difficulty}" if difficulty else ""


def classify(request_id: str, text: str, agent: str) -> Classification:
    """The labels written in `text`; `general`/`medium` (confidence 0) when there are none."""
    found = _LABEL.search(text)
    domain, difficulty = found.groups() if found else ("general", "medium")
    return Classification(
        request_id=request_id,
        agent=agent,
        domain=domain,
        confidence=1.0 if found else 0.0,
        complexity=Complexity(
            expected_tokens=expected_tokens(text, domain, difficulty),
            difficulty=difficulty,  # type: ignore[arg-type]
        ),
        gap=False,
    )


async def serve(agent: str, mqtt: MqttSettings) -> None:
    def card(epoch: int) -> AgentCard:
        return AgentCard(agent=agent, kind="classifier", epoch=epoch, started_at=now())

    def setup(bus: Bus, presence: Presence) -> None:
        async def handle(request: Request[ClassifyRequest]) -> Classification:
            return classify(request.body.request_id, request.body.text, agent)

        bus.serve(CLASSIFY, handle, shared="classifiers")

    await run_agent(mqtt, agent=agent, service="classifier", card=card, setup=setup)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tools.bench.labels AGENT_ID")
    configure_logging("classifier", level="warning")
    asyncio.run(serve(sys.argv[1], MqttSettings()))


if __name__ == "__main__":
    main()
