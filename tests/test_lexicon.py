"""The lexicon (WordNet's nouns in the knowledge base): which of two answers its entries support,
in the code and end to end, where a general answer gets the expert's second opinion and the
lexicon's verdict decides which is the answer."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy as np
import pytest

from schemas import Answer, Check, Checked, Query
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import RemoteError
from services.core.topics import KB_CHECK, QUERIES
from services.kb.lexicon import Lexicon
from tests.broker import ROOT
from tests.conftest import running
from tests.test_kb import cli

# Two entries in WordNet's data.noun format (wndb(5)), after its license header's lines.
LINES = [
    "  1 This software and database is being provided to you, the LICENSEE, by",
    "08856630 15 n 02 Canberra 0 Australian_capital 0 002 @i 08524735 n 0000 #p 08852843 n 0000"
    " | the capital of Australia; located in southeastern Australia  ",
    "08860123 15 n 01 Sydney 0 002 @i 08524735 n 0000 #p 08852843 n 0000 | the largest city in"
    " Australia; located in southeastern Australia on the Tasman Sea  ",
]


def test_entries_are_read_from_wordnet_lines_and_found_by_their_words():
    lexicon = Lexicon.parse(LINES)
    assert len(lexicon) == 2  # the license line is no entry
    assert lexicon.entries[0] == (
        "canberra.n.08856630",
        "Canberra, Australian capital: the capital of Australia; located in southeastern Australia",
    )
    assert lexicon.lookup("australian capital") == [0] and lexicon.lookup("sydneys") == [1]
    found = lexicon.candidates("What is the capital of Australia?",
                               "The capital of Australia is Sydney, not Canberra.")  # fmt: skip
    assert found == {"sydney": [1], "canberra": [0]}  # not "capital": the question's own word


async def test_the_answer_whose_entry_is_about_the_question_wins_a_number_is_not_judged():
    lexicon = Lexicon.parse(LINES)
    question = np.array([1.0, 0.0], dtype=np.float32)
    embedded: list[list[str]] = []

    async def embed(texts: list[str]) -> np.ndarray:
        embedded.append(texts)
        return np.array([[0.9, 0.1] if "capital" in t else [0.2, 0.9] for t in texts], np.float32)

    answers = ["It is Sydney.", "It is Canberra."]
    verdict = await lexicon.check("What is the capital of Australia?", question, answers, embed)
    assert verdict.best == 1 and [e.term for e in verdict.evidence] == ["canberra", "sydney"]
    assert verdict.evidence[0].source == "WordNet 3.0 canberra.n.08856630"
    again = await lexicon.check("Where is the capital of Australia?", question, answers, embed)
    assert again.best == 1 and len(embedded) == 1  # entries are embedded once
    counted = await lexicon.check("How many cities?", question, answers, embed)
    assert counted.best is None and "number" in counted.reason
    none = await lexicon.check("Which city?", question, ["Yes.", "No."], embed)
    assert none.best is None and none.reason == "no answer names an entry of the lexicon"


async def check(bus: Bus, question: str, answers: list[str]) -> Checked:
    ask = Check(request_id=f"c{time.time_ns()}", domain="facts", question=question,
                answers=answers, deadline=time.time() + 30)  # fmt: skip
    reply = await bus.request(KB_CHECK.format(domain="facts"), ask, deadline=ask.deadline)
    assert isinstance(reply, Checked)
    return reply


async def test_the_knowledge_base_checks_answers_against_wordnet_over_the_bus(
    mqtt, login, uid, spawn, minilm_dir, tmp_path
):
    spawn("services.kb", "--agent-id", f"kb-{uid}", "--index-dir", str(tmp_path))
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    bus = Bus(
        settings=login(f"operator-{uid}", "operator"), client_id=f"operator-{uid}", service="test"
    )
    view = CmsView(bus)
    async with running(bus):
        assert await view.wait_online([f"kb-{uid}", f"cls-{uid}"], timeout=90)
        assert view.cards[f"kb-{uid}"].checks == ["facts"]
        spain = await check(bus, "What is the capital of Spain?",
                            ["The capital of Spain is Barcelona.", "It is Madrid."])  # fmt: skip
        planets = await check(bus, "Which planet is known as the Red Planet?",
                              ["Venus.", "The Red Planet is Mars."])  # fmt: skip
        count = await check(bus, "How many legs does a spider have?", ["Eight.", "Six."])
        with pytest.raises(RemoteError, match="answers"):  # the schema: at least one answer
            bad = Check.model_construct(request_id="bad", domain="facts", question="Why?",
                                        answers=[], deadline=time.time() + 9)  # fmt: skip
            await bus.request(KB_CHECK.format(domain="facts"), bad, deadline=bad.deadline)
        after = await check(bus, "What is the capital of Spain?", ["Madrid.", "Barcelona."])
        shown = await asyncio.to_thread(cli, mqtt, "check", "Which ocean is the largest?",
                                        "The Atlantic.", "The Pacific.")  # fmt: skip
        unheld = await asyncio.to_thread(cli, mqtt, "check", "Why?", "a", "b", "--domain", "art")
        listed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tools.cli.main", "agents",
             "--broker", f"{mqtt.host}:{mqtt.port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert spain.best == 1 and spain.evidence[0].term == "madrid", spain
    assert "capital of Spain" in spain.evidence[0].entry and spain.model == "all-MiniLM-L6-v2"
    assert planets.best == 1 and planets.evidence[0].term == "mars", planets
    assert count.best is None and "number" in count.reason
    assert after.best == 0  # the service goes on after bad input
    assert shown.returncode == 0, shown.stderr
    assert "supported: answer 2: The Pacific." in shown.stdout
    assert "'pacific'" in shown.stdout and "WordNet 3.0 pacific.n." in shown.stdout
    assert unheld.returncode == 1 and "no lexicon online checks domain 'art'" in unheld.stderr
    assert "health,environment +check:facts" in listed.stdout, listed.stdout


async def test_a_facts_answer_gets_the_experts_second_opinion_and_the_lexicons_verdict(
    login, uid, spawn, tiny_model_dir, minilm_dir, tmp_path
):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    spawn("services.worker", "--agent-id", f"w-{uid}", "--backend", "onnx",
          "--model-dir", str(tiny_model_dir), "--threads", "1")  # fmt: skip
    spawn("services.worker", "--agent-id", f"expert-{uid}", "--tokens-per-s", "2",
          "--domains", '["facts"]')  # fmt: skip
    spawn("services.kb", "--agent-id", f"kb-{uid}", "--index-dir", str(tmp_path))
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        agents = [f"orch-{uid}", f"cls-{uid}", f"w-{uid}", f"expert-{uid}", f"kb-{uid}"]
        assert await view.wait_online(agents, timeout=90)
        query = Query(request_id=f"q{time.time_ns()}", text="What is the capital of Japan?",
                      max_tokens=4, deadline=time.time() + 60, stream=True)  # fmt: skip
        answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
    assert isinstance(answer, Answer)
    names = [s.name for s in answer.steps]
    assert names == ["classify", "answer", "knowledge:facts", "check:facts"], answer.steps
    general, expert, verdict = answer.steps[1:]
    assert general.agent == f"w-{uid}" and general.output and expert.output
    assert general.detail.startswith("second opinion: facts answers are checked")
    assert verdict.agent == f"kb-{uid}" and verdict.topic == "knowledge/facts/check"
    assert verdict.outcome == "ok" and verdict.detail
    # the verdict: "'<term>' is nearest the question; <agent>'s '<term>' (score, entry); ..."
    reason, *evidence = verdict.detail.split("; ")
    best = evidence[0].split("'s ")[0] if "nearest" in reason else expert.agent
    chosen = general if best == general.agent else expert
    assert answer.text == chosen.output and answer.outcome == "edge"
    assert general.detail.endswith(f"the answer is {chosen.agent}'s")
