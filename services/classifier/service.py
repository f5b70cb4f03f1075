"""The Classifier Engine on the bus: computation/classify → Classification, and
computation/embed → Embeddings, so the site's one MiniLM serves every service that embeds
(the gateway's /v1/embeddings, the knowledge base) instead of one copy in each (~130 MB)."""

from __future__ import annotations

import asyncio

import numpy as np

from schemas import AgentMatch, Classification, ClassifyRequest, Embed, Embeddings
from services.classifier.engine import ClassificationResult, ClassifierEngine
from services.classifier.inputs import ClassifierInputError
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.embedder import Embedder
from services.core.errors import BadInput
from services.core.topics import CLASSIFY, EMBED


class Classifier:
    """Classifies texts against the online agents' cards in the CMS view."""

    def __init__(self, *, bus: Bus, view: CmsView, engine: ClassifierEngine) -> None:
        self.agent = bus.client_id
        self.view = view
        self.engine = engine
        bus.serve(CLASSIFY, self.handle, shared="classifiers")
        bus.serve(EMBED, self.handle_embed, shared="embedders")

    async def handle(self, request: Request[ClassifyRequest]) -> Classification:
        cards = [a.card for a in self.view.agents() if a.online]
        try:  # ~10 ms of onnxruntime: off the event loop
            result = await asyncio.to_thread(self.engine.classify, request.body.text, cards)
        except ClassifierInputError as exc:
            raise BadInput("bad_request", str(exc)) from None
        return to_message(request.body.request_id, result, agent=self.agent)

    async def handle_embed(self, request: Request[Embed]) -> Embeddings:
        embedder, texts = self.engine.embedder, request.body.texts
        vectors, tokens = await asyncio.to_thread(embed_counted, embedder, texts)
        return Embeddings(
            request_id=request.body.request_id,
            agent=self.agent,
            model=embedder.card.name,
            dims=embedder.dims,
            tokens=tokens,
            vectors=np.round(vectors, 7).tolist(),
        )


def embed_counted(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, int]:
    tokens = sum(len(e.ids) for e in embedder.tokenizer.encode_batch(texts))
    return embedder.embed(texts), tokens


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
