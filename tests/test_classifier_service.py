"""The Classifier Engine as a service on a real broker."""

from __future__ import annotations

import time

import numpy as np
import pytest

from schemas import Classification, ClassifyRequest, Embed
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.embeddings import embed
from services.core.errors import RemoteError
from services.core.topics import CLASSIFY, EMBED
from tests.conftest import running, wait_for
from tests.test_stack import online


async def test_classifier_service_answers_with_domain_gap_and_matches(
    login, uid, spawn, minilm_dir
):
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    spawn("services.worker", "--agent-id", f"med-{uid}", "--domains", '["health"]')
    bus = Bus(settings=login(f"c-{uid}", "orchestrator"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        await wait_for(online(view, f"cls-{uid}", f"med-{uid}"), timeout=60)

        async def classify(text: str) -> Classification:
            request = ClassifyRequest(request_id=f"r{time.time_ns()}", text=text)
            reply = await bus.request(CLASSIFY.format(), request, deadline=time.time() + 20)
            assert isinstance(reply, Classification)
            return reply

        health = await classify("My heart rate is 120 and I have a fever, should I worry?")
        code = await classify("Write a Python function that reverses a linked list.")
        with pytest.raises(RemoteError) as raised:
            await classify(" " * 10)
    assert health.domain == "health" and health.gap is False
    assert health.matches and health.matches[0].agent == f"med-{uid}"
    assert code.domain == "code" and code.gap is True
    assert code.complexity.expected_tokens in (50, 100, 200, 300, 500)
    assert raised.value.error.code == "bad_request" and "empty" in raised.value.error.message


async def test_the_classifier_embeds_for_services_that_hold_no_model(login, uid, spawn, minilm_dir):
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    bus = Bus(settings=login(f"kb-{uid}", "kb"), client_id=f"kb-{uid}", service="test")  # embeds
    view = CmsView(bus)
    texts = ["the air in the park is clean", "air quality in the park is good", "def f(x):"]
    async with running(bus):
        assert await view.wait_online([f"cls-{uid}"], timeout=60)
        done = await embed(bus, texts * 12)  # 36 texts: two requests
        with pytest.raises(RemoteError, match="texts"):
            too_many = Embed(request_id="e1", texts=["x"]).model_copy(update={"texts": ["x"] * 33})
            await bus.request(EMBED.format(), too_many, deadline=time.time() + 30)
    v = done.vectors
    assert v.shape == (36, 384) and done.model == "all-MiniLM-L6-v2" and done.tokens > 36
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] and np.allclose(v[0], v[3], atol=1e-6)
    assert view.cards[f"cls-{uid}"].model.name == "all-MiniLM-L6-v2"  # what /v1/models lists
