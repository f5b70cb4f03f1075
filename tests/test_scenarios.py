"""The paper's two scenarios end to end on a real broker, with the tiny model and real MiniLM."""

from __future__ import annotations

import signal
import time

from schemas import Answer, Query
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import QUERIES
from services.data.grounding import claims, number, supported
from tests.conftest import running

CITY = {"camera-{uid}": ["camera"], "air-{uid}": ["pm25", "no2"], "noise-{uid}": ["noise"],
        "traffic-{uid}": ["traffic"]}  # fmt: skip


def start(spawn, uid: str, tiny_model_dir, minilm_dir) -> dict[str, object]:  # type: ignore[no-untyped-def]
    procs = {
        "orch": spawn("services.orchestrator", "--agent-id", f"orch-{uid}"),
        "cls": spawn("services.classifier", "--agent-id", f"cls-{uid}",
                     "--model-dir", str(minilm_dir)),
        "worker": spawn("services.worker", "--agent-id", f"slm-{uid}", "--backend", "onnx",
                        "--model-dir", str(tiny_model_dir), "--threads", "1",
                        "--domains", '["health","environment"]'),
        "wearable": spawn("services.sensor", "--agent-id", f"wearable-{uid}",
                          "--profile", "wearable", "--rate-hz", "5", "--event", "fever"),
    }  # fmt: skip
    for name, streams in CITY.items():
        agent = name.format(uid=uid)
        procs[agent] = spawn(
            "services.sensor",
            "--agent-id",
            agent,
            "--profile",
            "city",
            "--rate-hz",
            "5",
            "--streams",
            str(streams).replace("'", '"'),
        )
    return procs


async def ask(bus: Bus, text: str) -> Answer:
    query = Query(
        request_id=f"q{time.time_ns()}", text=text, max_tokens=24, deadline=time.time() + 60
    )
    answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
    assert isinstance(answer, Answer)
    return answer


def names(answer: Answer) -> list[str]:
    return [s.name for s in answer.steps]


def assert_grounded(answer: Answer, agents: set[str]) -> None:
    """The answer names each measured value, from the readings of `agents`, and every number
    with a unit in it is one of them (or a threshold)."""
    assert {f.agent for f in answer.facts} == agents and answer.verified is not None
    for fact in answer.facts:
        assert f"{number(fact, fact.value)} {fact.unit}" in answer.text, fact
        assert fact.label in answer.text, fact
        if fact.alert:
            assert f"{fact.side} {number(fact, fact.threshold or 0)} {fact.unit}" in answer.text
    assert all(supported(c, answer.facts) for c in claims(answer.text)), answer.text


async def test_health_and_city_scenarios(login, uid, spawn, tiny_model_dir, minilm_dir):
    procs = start(spawn, uid, tiny_model_dir, minilm_dir)
    agents = [f"orch-{uid}", f"cls-{uid}", f"slm-{uid}", f"wearable-{uid}",
              *(n.format(uid=uid) for n in CITY)]  # fmt: skip
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        assert await view.wait_online(agents, timeout=90), [a for a in agents if not view.online(a)]
        health = await ask(bus, "I feel dizzy and feverish and my heart races. What should I do?")
        city = await ask(bus, "Evaluate environmental risks for setting up an outdoor event")
        procs[f"noise-{uid}"].send_signal(signal.SIGSTOP)  # hung: still online in the CMS
        try:
            partial = await ask(bus, "Evaluate environmental risks for an outdoor concert tonight")
        finally:
            procs[f"noise-{uid}"].send_signal(signal.SIGCONT)

    # Fig. 5a: sequential — vitals, then analysis, then the medical expert, then the answer
    assert names(health) == ["classify", f"data:wearable-{uid}", "analysis", "knowledge:health",
                             "answer"]  # fmt: skip
    assert health.outcome == "edge" and not health.partial
    vitals = health.steps[1]
    assert vitals.agent == f"wearable-{uid}" and vitals.outcome == "ok"
    assert health.steps[3].agent == f"slm-{uid}" and health.steps[3].output_tokens > 0
    assert_grounded(health, {f"wearable-{uid}"})  # the measured part, composed from the data
    assert health.text.startswith(f"Measured by wearable-{uid} (")
    assert "\n\nClinician report (from the readings):\n" in health.text

    # Fig. 5b: parallel — every city sensor and the expert at once, then the aggregation
    fan_out = {f"data:{n.format(uid=uid)}" for n in CITY} | {"knowledge:environment"}
    assert names(city)[0] == "classify" and set(names(city)[1:-1]) == fan_out
    assert names(city)[-1] == "answer" and city.outcome == "edge" and not city.partial
    data_ms = [s.ms for s in city.steps if s.name.startswith("data:")]
    assert sum(data_ms) > max(data_ms)  # they overlapped: each waited for its own fresh reading
    for step in city.steps[1:]:
        assert step.agent and step.topic and step.where == "edge" and step.ms > 0
    assert_grounded(city, {n.format(uid=uid) for n in CITY})
    assert city.text.startswith(("Risks now: ", "No risk past a threshold now."))

    # a sensor hung mid-plan: its step fails at its deadline, the answer still comes, partial
    failed = [s for s in partial.steps if s.outcome == "failed"]
    assert [s.name for s in failed] == [f"data:noise-{uid}"]
    assert "no fresh reading" in failed[0].detail
    assert partial.partial and partial.outcome == "edge" and partial.text


async def test_a_repeated_question_is_served_from_the_knowledge_cache(
    login, uid, spawn, tiny_model_dir, minilm_dir
):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    spawn(
        "services.worker",
        "--agent-id",
        f"slm-{uid}",
        "--backend",
        "onnx",
        "--model-dir",
        str(tiny_model_dir),
        "--threads",
        "1",
        "--domains",
        '["math"]',
    )
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    question = f"What is the derivative of x squared? ({uid})"
    async with running(bus):
        assert await view.wait_online([f"orch-{uid}", f"cls-{uid}", f"slm-{uid}"], timeout=90)
        first = await ask(bus, question)
        # No wait: the orchestrator wrote the cache entry before the first answer, so the
        # broker hands it the entry (cms/#) before the second question, which we ask after.
        second = await ask(bus, question)
    assert names(first) == ["classify", "knowledge:math", "answer"]
    assert first.steps[1].outcome == "ok" and second.steps[1].outcome == "cached"
    assert second.steps[1].agent == first.steps[1].agent == f"slm-{uid}"  # whose answer it was
