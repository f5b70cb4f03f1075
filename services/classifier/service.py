"""The Classifier Engine on the bus: computation/classify → Classification."""

from __future__ import annotations

import asyncio

from schemas import AgentMatch, Classification, ClassifyRequest
from services.classifier.engine import ClassificationResult, ClassifierEngine
from services.classifier.inputs import ClassifierInputError
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.errors import BadInput
from services.core.topics import CLASSIFY


class Classifier:
    """Classifies texts against the online agents' cards in the CMS view."""

    def __init__(self, *, bus: Bus, view: CmsView, engine: ClassifierEngine) -> None:
        self.agent = bus.client_id
        self.view = view
        self.engine = engine
        bus.serve(CLASSIFY, self.handle, shared="classifiers")

    async def handle(self, request: Request[ClassifyRequest]) -> Classification:
        cards = [a.card for a in self.view.agents() if a.online]
        try:  # ~10 ms of onnxruntime: off the event loop
            result = await asyncio.to_thread(self.engine.classify, request.body.text, cards)
        except ClassifierInputError as exc:
            raise BadInput("bad_request", str(exc)) from None
        return to_message(request.body.request_id, result, agent=self.agent)


def to_message(request_id: str, result: ClassificationResult, *, agent: str) -> Classification:
    return Classification(
        request_id=request_id,
        agent=agent,
        domain=result.domain,
        sub_labels=list(result.sub_labels),
        confidence=round(min(1.0, max(0.0, result.confidence)), 4),
        complexity=result.complexity,
        gap=result.gap,
        matches=[AgentMatch(agent=m.agent, score=round(m.score, 4)) for m in result.matches],
    )
