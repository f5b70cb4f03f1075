"""Knowledge gaps end to end on a real bus: the general worker (the tiny random model) reports
how sure it was of its first tokens; below the orchestrator's threshold, the expert of the
question's sub-label is asked and its answer is the answer, the general one kept in provenance.

The random model is never sure, so `--gap-confidence 1` forces the gap and 0 turns it off. The
expert is an emulated worker declaring `facts` at 2 tokens/s, so the allocator gives the
general answer to the (far faster) tiny model, never to the expert.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas import Answer, Query, Step
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import QUERIES
from tests.broker import ROOT
from tests.conftest import running
from tools.bench.gap import auroc, held_out
from tools.cli.ask import provenance

QUESTION = "What is the capital of France?"  # the classifier says general, sub-label facts


async def ask_with_threshold(login, uid, spawn, tiny_model_dir, minilm_dir, threshold: str):  # type: ignore[no-untyped-def]
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}", "--gap-confidence", threshold)
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    spawn("services.worker", "--agent-id", f"w-{uid}", "--backend", "onnx",
          "--model-dir", str(tiny_model_dir), "--threads", "1")  # fmt: skip
    spawn("services.worker", "--agent-id", f"expert-{uid}", "--tokens-per-s", "2",
          "--domains", '["facts"]')  # fmt: skip
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        agents = [f"orch-{uid}", f"cls-{uid}", f"w-{uid}", f"expert-{uid}"]
        assert await view.wait_online(agents, timeout=90)
        # the question as it is: a suffix (say the uid) can change its sub-labels, and with
        # them whether a `facts` expert is the gap's
        query = Query(request_id=f"q{time.time_ns()}", text=QUESTION, max_tokens=4,
                      deadline=time.time() + 60, stream=True)  # fmt: skip
        answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
    assert isinstance(answer, Answer)
    return answer


async def test_a_gap_in_the_general_answer_asks_the_expert(
    login, uid, spawn, tiny_model_dir, minilm_dir
):
    answer = await ask_with_threshold(login, uid, spawn, tiny_model_dir, minilm_dir, "1")
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
    login, uid, spawn, tiny_model_dir, minilm_dir
):
    answer = await ask_with_threshold(login, uid, spawn, tiny_model_dir, minilm_dir, "0")
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
    assert "answer of step answer (worker-1, confidence 0.31), not taken:" in shown
    assert "| Kyoto, I think." in shown and "Tokyo." not in shown.split("not taken:")[1]
    kept = answer.model_copy(update={"text": "Kyoto, I think."})  # the lexicon chose it
    shown = provenance(kept)
    assert "answer of step knowledge:facts (code-1), not taken:\n     | Tokyo." in shown
    assert "Kyoto" not in shown.split("not taken:")[1]


def test_auroc_and_the_threshold_chosen_on_one_half_checked_on_the_other():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5 and auroc([0.5], [True]) is None

    def pair(confidence: float, general: bool, expert: bool) -> tuple[dict, bool]:
        return {"id": "x", "confidence": confidence, "correct": general}, expert

    # below 0.5 the general model is wrong and the expert right: that threshold is chosen
    choose = [pair(0.9, True, False), pair(0.3, False, True), pair(0.4, False, True)]
    check = [pair(0.8, True, True), pair(0.2, False, True), pair(0.6, False, False)]
    result = held_out(choose, check)
    assert 0.4 <= result["threshold"] < 0.9  # just above the unsure ones
    assert (result["general_alone"], result["expert_alone"], result["either_right"]) == (1, 2, 2)
    assert (result["cooperating"], result["asked_expert"]) == (2, 1)


@pytest.mark.timeout(600)
def test_bench_sampling_and_bench_gap_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path):
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "bench", "sampling", "--model",
         str(tiny_model_dir), "--domain", "facts", "--limit", "2", "--setting", "baseline",
         "--setting", "penalty-1.15"],
        cwd=ROOT, capture_output=True, text=True, timeout=590,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert set(report["settings"]) == {"baseline", "penalty-1.15"}
    facts = report["settings"]["penalty-1.15"]["domains"]["facts"]
    assert facts["n"] == 2 and report["settings"]["penalty-1.15"]["repetition_penalty"] == 1.15
    assert all(0 < item["confidence"] <= 1 for item in facts["items"])
    (tmp_path / "s.json").write_text(run.stdout)
    gap = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "bench", "gap", "--general",
         str(tmp_path / "s.json"), "--expert", str(tmp_path / "s.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert gap.returncode == 0, gap.stderr[-3000:]
    analysed = json.loads(gap.stdout)["domains"]["facts"]
    assert analysed["n"] == 2 and set(analysed["halves"]) == {"chosen_on_even", "chosen_on_odd"}
