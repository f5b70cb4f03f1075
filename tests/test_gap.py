"""Knowledge gaps end to end on a real bus: the general worker (the tiny random model) reports
how sure it was of its first tokens; below the orchestrator's threshold, the expert of the
question's sub-label is asked and its answer is the answer, the general one kept in provenance.

The random model is never sure, so `--gap-confidence 1` forces the gap and 0 turns it off. The
expert is an emulated worker declaring `facts` at 2 tokens/s, so the allocator gives the
general answer to the (far faster) tiny model, never to the expert.
"""

from __future__ import annotations

import time

from schemas import Answer, Query, Step
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import QUERIES
from tests.conftest import running
from tools.cli.ask import provenance

QUESTION = "What is the capital of France?"  # the classifier says general, sub-label facts


async def ask_with_threshold(mqtt, uid, spawn, tiny_model_dir, minilm_dir, threshold: str):  # type: ignore[no-untyped-def]
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}", "--gap-confidence", threshold)
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    spawn("services.worker", "--agent-id", f"w-{uid}", "--backend", "onnx",
          "--model-dir", str(tiny_model_dir), "--threads", "1")  # fmt: skip
    spawn("services.worker", "--agent-id", f"expert-{uid}", "--tokens-per-s", "2",
          "--domains", '["facts"]')  # fmt: skip
    bus = Bus(settings=mqtt, client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        agents = [f"orch-{uid}", f"cls-{uid}", f"w-{uid}", f"expert-{uid}"]
        assert await view.wait_online(agents, timeout=90)
        query = Query(request_id=f"q{time.time_ns()}", text=f"{QUESTION} ({uid})", max_tokens=4,
                      deadline=time.time() + 60, stream=True)  # fmt: skip
        answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
    assert isinstance(answer, Answer)
    return answer


async def test_a_gap_in_the_general_answer_asks_the_expert(
    mqtt, uid, spawn, tiny_model_dir, minilm_dir
):
    answer = await ask_with_threshold(mqtt, uid, spawn, tiny_model_dir, minilm_dir, "1")
    assert [s.name for s in answer.steps] == ["classify", "answer", "knowledge:facts"]
    general, expert = answer.steps[1], answer.steps[2]
    assert general.agent == f"w-{uid}" and general.outcome == "ok"
    assert general.confidence is not None and general.confidence < 1
    assert general.detail.startswith(f"gap: confidence {general.confidence:.2f} below 1.00")
    assert general.output  # the general model's own answer stays in the provenance
    assert expert.agent == f"expert-{uid}" and expert.topic == "knowledge/facts/ask"
    assert expert.outcome == "ok" and expert.output == answer.text and answer.text
    assert answer.outcome == "edge" and not answer.partial


async def test_without_a_gap_the_general_answer_stands(
    mqtt, uid, spawn, tiny_model_dir, minilm_dir
):
    answer = await ask_with_threshold(mqtt, uid, spawn, tiny_model_dir, minilm_dir, "0")
    assert [s.name for s in answer.steps] == ["classify", "answer"]
    general = answer.steps[1]
    assert general.agent == f"w-{uid}" and general.confidence is not None
    assert general.output is None and general.detail is None
    assert answer.outcome == "edge" and answer.text


def test_ask_shows_what_the_general_model_said_before_the_expert():
    general = Step(name="answer", topic="computation/tasks/worker-1", agent="worker-1",
                   where="edge", outcome="ok", confidence=0.31, output="Kyoto, I think.",
                   detail="gap: confidence 0.31 below 0.50; the answer is code-1's")  # fmt: skip
    expert = Step(name="knowledge:facts", topic="knowledge/facts/ask", agent="code-1",
                  where="edge", outcome="ok", output="Tokyo.")  # fmt: skip
    answer = Answer(request_id="r1", text="Tokyo.", outcome="edge", steps=[general, expert])
    shown = provenance(answer)
    assert "answer of step answer (worker-1, confidence 0.31), replaced:" in shown
    assert "| Kyoto, I think." in shown and "Tokyo." not in shown.split("replaced:")[1]
