"""Math by program: the program taken from a reply, and the plan end to end on a real bus
(classifier, orchestrator, sandbox and workers as processes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from schemas import AgentCard, Answer, KnowledgeAnswer, KnowledgeQuery, Query, now
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.presence import Presence
from services.core.topics import KNOWLEDGE, QUERIES
from services.orchestrator.programs import code_blocks, extract_program, printed_answer
from tests.conftest import running

QUESTION = "What is the derivative of x squared?"  # the classifier says math


def test_the_program_is_the_first_python_block_of_the_reply():
    reply = "Sure:\n```bash\necho no\n```\nThen\n```python\n    x = 6\n    print(x * 7)\n```\nDone."
    assert code_blocks(reply) == [("bash", "echo no"), ("python", "    x = 6\n    print(x * 7)")]
    assert extract_program(reply) == "x = 6\nprint(x * 7)\n"
    assert extract_program("```\nprint(1)\n```") == "print(1)\n"  # untagged counts
    assert extract_program("```py\nprint(2)") == "print(2)\n"  # cut off inside its block
    assert extract_program("print(3)") is None  # no fence, no program
    assert extract_program("```python\n\n```") is None


def test_the_answer_is_the_last_line_printed():
    assert printed_answer("step 1\n\n42\n\n") == "42"
    assert printed_answer("  \n") is None


def start(spawn, uid: str, minilm_dir) -> list[str]:  # type: ignore[no-untyped-def]
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    spawn("services.sandbox", "--agent-id", f"sbx-{uid}")
    spawn("services.worker", "--agent-id", f"w-{uid}", "--tokens-per-s", "500")
    return [f"orch-{uid}", f"cls-{uid}", f"sbx-{uid}", f"w-{uid}"]


async def code_expert(login, agent: str, reply: Callable[[str], str]):  # type: ignore[no-untyped-def]
    """A test-only code expert on the bus: its card says "code", it answers every knowledge
    question with `reply(question)`."""
    card = AgentCard(agent=agent, kind="worker", epoch=1, domains=["code"], concurrency=4,
                     tokens_per_s=100.0, started_at=now())  # fmt: skip
    mqtt = login(agent, "worker")
    presence = Presence(card, heartbeat_s=mqtt.keepalive / 2)
    bus = Bus(settings=mqtt, client_id=agent, service="test", will=presence.will())
    questions: list[KnowledgeQuery] = []

    async def answer(request: Request[KnowledgeQuery]) -> KnowledgeAnswer:
        questions.append(request.body)
        return KnowledgeAnswer(
            request_id=request.body.request_id, agent=agent, domain="code",
            answer=reply(request.body.question), output_tokens=12,
        )  # fmt: skip

    bus.serve(KNOWLEDGE, answer, shared="knowledge-code", domain="code")
    presence.attach(bus)
    return bus, presence, questions


async def ask(bus: Bus, text: str) -> Answer:
    query = Query(request_id=f"q{time.time_ns()}", text=text, max_tokens=16,
                  deadline=time.time() + 90)  # fmt: skip
    answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
    assert isinstance(answer, Answer)
    return answer


def steps(answer: Answer) -> dict[str, object]:
    return {s.name: s for s in answer.steps}


async def run_with_expert(login, uid, spawn, minilm_dir, reply):  # type: ignore[no-untyped-def]
    agents = start(spawn, uid, minilm_dir)
    expert_bus, presence, questions = await code_expert(login, f"coder-{uid}", reply)
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(expert_bus), running(bus):
        heartbeat = asyncio.create_task(presence.run(expert_bus))
        try:
            assert await view.wait_online([*agents, f"coder-{uid}"], timeout=90)
            answer = await ask(bus, f"{QUESTION} ({uid})")
        finally:
            heartbeat.cancel()
            await presence.retire(expert_bus)  # offline: later tests' orchestrators skip it
    return answer, questions


async def test_math_is_answered_by_what_the_experts_program_printed(login, uid, spawn, minilm_dir):
    answer, questions = await run_with_expert(
        login, uid, spawn, minilm_dir, lambda q: "Here it is:\n```python\nprint(6 * 7)\n```\n"
    )
    assert answer.text == "42" and answer.outcome == "edge" and not answer.partial
    assert [s.name for s in answer.steps] == ["classify", "program", "sandbox"]
    program, ran = steps(answer)["program"], steps(answer)["sandbox"]
    assert program.agent == f"coder-{uid}" and program.topic == "knowledge/code/ask"
    assert program.program == "print(6 * 7)\n" and program.outcome == "ok"
    assert ran.agent == f"sbx-{uid}" and ran.topic == "knowledge/arithmetic/run"
    assert ran.outcome == "ok" and "printed: 42" in ran.detail
    asked = questions[0]
    assert QUESTION in asked.question and "```python" in asked.question
    assert asked.sampling.repetition_penalty == 1.0  # code wants its identifiers repeated


async def test_a_program_that_fails_falls_back_to_a_plain_answer_marked_so(
    login, uid, spawn, minilm_dir
):
    answer, _ = await run_with_expert(
        login, uid, spawn, minilm_dir, lambda q: "```python\nprint(1 / 0)\n```"
    )
    assert answer.outcome == "edge" and answer.partial and answer.text
    assert [s.name for s in answer.steps] == ["classify", "program", "sandbox", "answer"]
    ran, final = steps(answer)["sandbox"], steps(answer)["answer"]
    assert ran.outcome == "failed" and ran.detail == "ZeroDivisionError: division by zero"
    assert final.outcome == "ok" and final.agent == f"w-{uid}"
    assert final.detail.startswith("fallback: a plain generation")


async def test_without_an_expert_any_worker_writes_and_nonsense_falls_back(
    login, uid, spawn, minilm_dir
):
    agents = start(spawn, uid, minilm_dir)
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        assert await view.wait_online(agents, timeout=90)
        answer = await ask(bus, f"{QUESTION} ({uid})")
    assert [s.name for s in answer.steps] == ["classify", "program", "answer"]
    program, final = steps(answer)["program"], steps(answer)["answer"]
    assert program.agent == f"w-{uid}" and program.topic == f"computation/tasks/w-{uid}"
    assert program.outcome == "failed" and "code block" in program.detail
    assert answer.partial and answer.outcome == "edge" and answer.text
    assert final.detail.startswith("fallback: a plain generation")
