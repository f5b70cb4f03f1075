"""Embedding texts over the bus (computation/embed), for services that hold no model.

The Classifier Engine answers with its MiniLM; texts go in batches of what one request
carries. No embedder online is `NoSubscriber` at once (the broker says nobody listens).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np

from schemas import Embed, Embeddings
from schemas.messages import EMBED_BATCH
from services.core.bus import Bus
from services.core.topics import EMBED

TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: np.ndarray  # float32 [texts, dims], unit length
    model: str
    tokens: int


async def embed(bus: Bus, texts: list[str], *, timeout_s: float = TIMEOUT_S) -> Embedded:
    """Vectors for `texts`; raises NoSubscriber, DeadlineExceeded or RemoteError."""
    parts, model, tokens = [], "", 0
    for start in range(0, len(texts), EMBED_BATCH):
        batch = texts[start : start + EMBED_BATCH]
        request = Embed(request_id=f"e{uuid.uuid4().hex[:12]}", texts=batch)
        reply = await bus.request(EMBED.format(), request, deadline=time.time() + timeout_s)
        assert isinstance(reply, Embeddings)
        parts.append(np.asarray(reply.vectors, dtype=np.float32).reshape(-1, reply.dims))
        model, tokens = reply.model, tokens + reply.tokens
    return Embedded(np.concatenate(parts), model, tokens)
