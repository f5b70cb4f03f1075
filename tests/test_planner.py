"""Plans are pure: their shape follows the domain, the sensors and the experts online."""

from __future__ import annotations

import pytest

from schemas import SamplingOptions
from services.orchestrator.planner import (
    PROSE,
    Plan,
    PlanStep,
    Sensor,
    make_plan,
    render,
    with_passages,
)
from services.orchestrator.service import under

WEARABLES = [Sensor("wearable-1", "health"), Sensor("ring-1", "health")]
CITY = [Sensor(a, "environment") for a in ("camera-1", "air-1", "noise-1", "traffic-1")]


def names(layer: list[PlanStep]) -> list[str]:
    return [s.name for s in layer]


def test_health_is_sequential_vitals_analysis_expert_answer():
    plan = make_plan(
        domain="health", max_tokens=200, sensors=WEARABLES + CITY, expert_available=True
    )
    assert plan.shape == "sequential"
    assert [names(p) for p in plan.phases()] == [
        ["data:wearable-1", "data:ring-1"],
        ["analysis"],
        ["knowledge:health"],
        ["answer"],
    ]
    assert plan.final.max_tokens == 200


def test_environment_fans_out_to_every_sensor_and_the_expert_in_parallel():
    plan = make_plan(
        domain="environment", max_tokens=150, sensors=CITY + WEARABLES, expert_available=True
    )
    phases = plan.phases()
    assert plan.shape == "parallel" and len(phases) == 2
    assert set(names(phases[0])) == {*(f"data:{s.agent}" for s in CITY), "knowledge:environment"}
    assert names(phases[1]) == ["answer"]


def test_other_domains_are_one_generation_with_an_expert_when_there_is_one():
    assert [names(p) for p in make_plan(domain="math", max_tokens=50).phases()] == [["answer"]]
    with_expert = make_plan(domain="code", max_tokens=50, expert_available=True)
    assert [names(p) for p in with_expert.phases()] == [["knowledge:code"], ["answer"]]


def test_health_without_sensors_falls_back_to_expert_and_answer():
    plan = make_plan(domain="health", max_tokens=50, sensors=CITY, expert_available=True)
    assert [names(p) for p in plan.phases()] == [["knowledge:health"], ["answer"]]


def test_render_folds_the_inputs_outputs_into_the_prompt():
    step = PlanStep("answer", "generate", after=("a", "b"), prompt="{context} | {query}")
    assert render(step, "q?", {"a": "one", "b": ""}) == "[a] one | q?"
    assert render(step, "q?", {}) == "(no context) | q?"


def test_a_plan_refuses_unknown_dependencies_and_cycles():
    with pytest.raises(ValueError, match="unknown"):
        Plan("x", (PlanStep("a", "generate", after=("z",)),))
    cyclic = Plan("x", (PlanStep("a", "generate", after=("b",)), PlanStep("b", "generate")))
    object.__setattr__(cyclic.by_name["b"], "after", ("a",))
    with pytest.raises(ValueError, match="cycle"):
        cyclic.phases()


def test_a_discovered_device_is_a_data_step_with_its_freshness_and_the_answer_sees_the_vitals():
    watch = Sensor("watch-7", "health", max_age_s=60)
    plan = make_plan(domain="health", max_tokens=50, sensors=[WEARABLES[0], watch])
    assert [(s.name, s.max_age_s) for s in plan.sensed] == [
        ("data:wearable-1", None),
        ("data:watch-7", 60),
    ]
    assert plan.final.after == ("data:wearable-1", "data:watch-7", "analysis")
    assert make_plan(domain="math", max_tokens=50, sensors=[watch]).sensed == []


def test_math_with_a_sandbox_is_a_program_then_its_fallback():
    plan = make_plan(
        domain="math", max_tokens=60, expert_available=True, sandbox_available=True,
        program_writer="code",
    )  # fmt: skip
    assert [names(p) for p in plan.phases()] == [["program"], ["answer"]]
    program, answer = plan.steps
    assert program.kind == "program" and program.domain == "code" and "{query}" in program.prompt
    assert answer.kind == "generate" and answer.fallback_of == "program"
    assert answer.max_tokens == 60
    # the fallback's prompt is the plain one: a failed program leaves no output behind
    assert render(answer, "2+2?", {}) == render(make_plan(domain="math", max_tokens=60).final,
                                                "2+2?", {})  # fmt: skip
    anyone = make_plan(domain="math", max_tokens=60, sandbox_available=True)
    assert anyone.steps[0].domain is None  # no expert: any worker writes it
    assert [names(p) for p in make_plan(domain="code", max_tokens=9, sandbox_available=True)
            .phases()] == [["answer"]]  # fmt: skip


def test_the_code_experts_answer_is_the_answer_decoded_exactly():
    plan = make_plan(domain="code", max_tokens=200, expert_available=True)
    expert, answer = plan.steps
    assert expert.max_tokens == 200 and expert.sampling is not None
    assert (expert.sampling.temperature, expert.sampling.repetition_penalty) == (0.0, 1.0)
    assert answer.fallback_of == expert.name  # a plain generation only when the expert gave none


def test_a_knowledge_base_retrieves_first_and_every_generation_and_expert_reads_it():
    plan = with_passages(
        make_plan(domain="health", max_tokens=50, sensors=WEARABLES, expert_available=True)
    )
    assert [names(p) for p in plan.phases()] == [
        ["retrieve:health", "data:wearable-1", "data:ring-1"],
        ["analysis"],
        ["knowledge:health"],
        ["answer"],
    ]
    retrieve = plan.by_name["retrieve:health"]
    assert retrieve.kind == "retrieve" and "heart_rate" in retrieve.streams  # ranges for the data
    for name in ("analysis", "knowledge:health", "answer"):
        assert "retrieve:health" in plan.by_name[name].after
    plain = with_passages(make_plan(domain="environment", max_tokens=50, expert_available=True))
    assert [names(p) for p in plain.phases()] == [
        ["retrieve:environment"],
        ["knowledge:environment"],
        ["answer"],
    ]
    assert plain.by_name["retrieve:environment"].streams == ()  # no data: no ranges needed


def test_advice_is_decoded_with_a_penalty_and_the_users_choice_wins():
    health = make_plan(domain="health", max_tokens=50, sensors=WEARABLES, expert_available=True)
    city = make_plan(domain="environment", max_tokens=50, sensors=CITY, expert_available=True)
    prose = [s for p in (health, city) for s in p.steps if s.kind in ("generate", "knowledge")]
    assert prose and all(s.sampling == PROSE for s in prose)
    facts = make_plan(domain="general", max_tokens=50)
    assert facts.final.sampling is None  # facts do best without a penalty (bench sampling)
    asked = SamplingOptions(repetition_penalty=1.0, temperature=0.2)
    assert under(PROSE, asked) == asked
    assert under(PROSE, SamplingOptions(temperature=0.2)) == SamplingOptions(
        temperature=0.2, repetition_penalty=1.15
    )
    assert under(None, asked) is asked
