"""The Classifier Engine as a service on a real broker."""

from __future__ import annotations

import time

import pytest

from schemas import Classification, ClassifyRequest
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import RemoteError
from services.core.topics import CLASSIFY
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
