"""Plans: a classified query becomes a small DAG of steps (pure; no bus).

Step kinds, each addressed to a semantic topic:
  data       fresh readings of one sensor agent   (data/<domain>/+/<agent>, mirrored locally)
  knowledge  an expert peer's answer              (knowledge/<domain>/ask)
  generate   an SLM generation on an edge worker  (computation/tasks/<agent>, allocated by policy)
  program    a program written by the code expert (or any worker), run by the sandboxed
             calculator peer (knowledge/arithmetic/run); its output is what it printed
  retrieve   passages of a domain's knowledge base  (knowledge/<domain>/retrieve)

Shapes follow the paper's scenarios (Fig. 5): `health` is sequential (vitals, then an analysis,
then the medical expert, then the answer); `environment` fans out to every sensor and an expert
in parallel, then aggregates; other domains are one generation, preceded by an expert's answer
when the domain is covered by an expert in the CMS.

A plan with data steps is grounded: the orchestrator composes the measured part of its answer
from the readings (services/data/grounding.py); the final generation writes only the advice
around them, and its prompts say so.

Knowledge gaps: a plain answer (no expert of the query's domain online) whose domain or
sub-label (e.g. `facts`) an expert declares carries `gap_domain`: when the general worker's
answer shows a gap (its confidence below the orchestrator's threshold), that expert is asked on
knowledge/<gap_domain>/ask and its answer is the answer (services/orchestrator/service.py).

With a knowledge base of the domain online, `with_passages` puts a retrieve step first (in
parallel with the data steps); every generation and expert after it reads its passages, and the
answer cites them.

`math` with a sandbox online is answered by
a program (`programs.py`): the answer is what the program printed, and a plain generation only
when no program ran to success (the fallback, marked so in the provenance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from schemas import SamplingOptions
from services.data.streams import STREAMS

StepKind = Literal["data", "knowledge", "generate", "program", "retrieve"]


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One step; `prompt` is a template over the query and the outputs of `after`."""

    name: str
    kind: StepKind
    after: tuple[str, ...] = ()
    agent: str | None = None  # data steps: the sensor; generate steps: chosen at run time
    domain: str | None = None
    prompt: str = ""
    max_tokens: int = 128
    # data steps: a reading that arrived this long before the plan began is fresh enough
    # (a device discovered from its data); None: only one newer than the plan (a sensor agent)
    max_age_s: float | None = None
    # A fallback: when the step named here produced an output, that output is this step's, and
    # this one runs (as a plain generation) only when it did not.
    fallback_of: str | None = None
    # decoding asked of the agent, under what the query sets (None: its model's defaults)
    sampling: SamplingOptions | None = None
    # generate steps: the expert domain asked when this answer shows a knowledge gap
    gap_domain: str | None = None
    # retrieve steps: the streams whose reference ranges are fetched too (a plan with data)
    streams: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Steps in dependency order; the last one is the answer."""

    domain: str
    steps: tuple[PlanStep, ...]
    shape: Literal["single", "parallel", "sequential"] = "single"
    by_name: dict[str, PlanStep] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {s.name: s for s in self.steps})
        for step in self.steps:
            unknown = [d for d in step.after if d not in self.by_name]
            if unknown:
                raise ValueError(f"step {step.name} waits on unknown steps {unknown}")

    @property
    def final(self) -> PlanStep:
        return self.steps[-1]

    @property
    def sensed(self) -> list[PlanStep]:
        """The data steps: when there are any, the answer's measured part is composed from them."""
        return [s for s in self.steps if s.kind == "data"]

    def phases(self) -> list[list[PlanStep]]:
        """Layers of steps whose dependencies are all in earlier layers (run each in parallel)."""
        done: set[str] = set()
        layers: list[list[PlanStep]] = []
        while len(done) < len(self.steps):
            layer = [s for s in self.steps if s.name not in done and set(s.after) <= done]
            if not layer:
                raise ValueError("the plan has a cycle")
            layers.append(layer)
            done |= {s.name for s in layer}
        return layers


@dataclass(frozen=True, slots=True)
class Sensor:
    """A sensor of a domain: an agent with a card in the CMS, or a device discovered from its
    readings (`max_age_s`: how old its newest reading may be; see PlanStep)."""

    agent: str
    domain: str
    max_age_s: float | None = None


def make_plan(
    *,
    domain: str,
    max_tokens: int,
    sensors: Sequence[Sensor] = (),
    expert_available: bool = False,
    sandbox_available: bool = False,
    program_writer: str | None = None,
    gap_domain: str | None = None,
) -> Plan:
    """The plan for a query of `domain` given the sensors, experts and sandboxes online;
    `program_writer` is the expert domain asked for programs (None: any worker writes them),
    `gap_domain` the one asked when a plain answer shows a gap (None: none is asked)."""
    data = [
        PlanStep(f"data:{s.agent}", "data", agent=s.agent, domain=domain, max_age_s=s.max_age_s)
        for s in sensors
        if s.domain == domain
    ]
    if domain == "health" and data:
        return _health(data, max_tokens, expert_available)
    if domain == "environment" and data:
        return _environment(data, max_tokens, expert_available)
    if domain == "math" and sandbox_available:
        return _by_program(domain, max_tokens, program_writer)
    if domain in EXPERT_ANSWERS and expert_available:
        return _by_expert(domain, max_tokens)
    expert = [_expert(domain, ())] if expert_available else []
    answer = PlanStep(
        "answer",
        "generate",
        after=tuple(s.name for s in expert),
        prompt=ANSWER,
        max_tokens=max_tokens,
        gap_domain=None if expert else gap_domain,
    )
    return Plan(domain, (*expert, answer), "sequential" if expert else "single")


def _health(data: list[PlanStep], max_tokens: int, expert: bool) -> Plan:
    vitals = tuple(s.name for s in data)
    analysis = PlanStep(
        "analysis", "generate", after=vitals, prompt=ANALYSIS, max_tokens=96, sampling=PROSE
    )
    steps: list[PlanStep] = [*data, analysis]
    if expert:
        steps.append(_expert("health", ("analysis",), sampling=PROSE))
    answer = PlanStep(
        "answer",
        "generate",
        after=(*vitals, steps[-1].name),  # the vitals too: the advice is about them
        prompt=HEALTH_ANSWER,
        max_tokens=max_tokens,
        sampling=PROSE,
    )
    return Plan("health", (*steps, answer), "sequential")


def _environment(data: list[PlanStep], max_tokens: int, expert: bool) -> Plan:
    fan_out = [*data, *([_expert("environment", (), sampling=PROSE)] if expert else [])]
    answer = PlanStep(
        "answer",
        "generate",
        after=tuple(s.name for s in fan_out),
        prompt=CITY_ANSWER,
        max_tokens=max_tokens,
        sampling=PROSE,
    )
    return Plan("environment", (*fan_out, answer), "parallel")


def _by_program(domain: str, max_tokens: int, writer: str | None) -> Plan:
    program = PlanStep(
        "program", "program", domain=writer, prompt=PROGRAM, max_tokens=PROGRAM_TOKENS
    )
    answer = PlanStep(
        "answer",
        "generate",
        after=("program",),
        prompt=ANSWER,
        max_tokens=max_tokens,
        fallback_of="program",
    )
    return Plan(domain, (program, answer), "sequential")


def _by_expert(domain: str, max_tokens: int) -> Plan:
    """The expert's answer is the answer (a general model rewriting code breaks it); a plain
    generation only when the expert gave none."""
    expert = PlanStep(
        f"knowledge:{domain}", "knowledge", domain=domain, prompt="{query}",
        max_tokens=max_tokens, sampling=EXACT,
    )  # fmt: skip
    answer = PlanStep(
        "answer", "generate", after=(expert.name,), prompt=ANSWER, max_tokens=max_tokens,
        fallback_of=expert.name,
    )  # fmt: skip
    return Plan(domain, (expert, answer), "sequential")


def with_passages(plan: Plan) -> Plan:
    """`plan` with a retrieve step first (a knowledge base of its domain is online), read by
    every generation and expert."""
    streams = tuple(s.name for s in STREAMS.values() if s.domain == plan.domain)
    retrieve = PlanStep(
        f"retrieve:{plan.domain}", "retrieve", domain=plan.domain, prompt="{query}",
        streams=streams if plan.sensed else (),
    )  # fmt: skip
    steps = [
        replace(s, after=(*s.after, retrieve.name)) if s.kind in ("generate", "knowledge") else s
        for s in plan.steps
    ]
    return Plan(plan.domain, (retrieve, *steps), plan.shape)


def _expert(
    domain: str, after: tuple[str, ...], sampling: SamplingOptions | None = None
) -> PlanStep:
    return PlanStep(
        f"knowledge:{domain}", "knowledge", after=after, domain=domain, prompt=EXPERT,
        max_tokens=96, sampling=sampling,
    )  # fmt: skip


# Domains whose expert's answer is the answer; code must repeat identifiers, so its expert
# decodes greedily without a repetition penalty (measured: 1.15 turned 5/20 functions into 0/20).
EXPERT_ANSWERS = frozenset({"code"})
EXACT = SamplingOptions(temperature=0.0, repetition_penalty=1.0)
# Advice is prose, which SmolLM2 loops in without a penalty (bench sampling --domain advice: a
# sentence repeated in 10 of 10 answers at 1.0, in none at 1.1 or 1.15); facts and code do best
# without one (bench sampling), so only the steps that write advice ask for it.
PROSE = SamplingOptions(repetition_penalty=1.15)

# Prompt templates: {query} is the user's text, {context} the outputs of the step's `after`.
ANSWER = "{context}\n\nQuestion: {query}"
PROGRAM = (
    "Write a short Python program that solves this problem and prints only the final answer, "
    "and nothing else. Give the whole program in one ```python code block.\n\n"
    "Problem: {query}"
)
PROGRAM_TOKENS = 320
EXPERT = "{query}\n\n{context}"
ANALYSIS = (
    "Vital signs from the user's wearable:\n{context}\n\nThe user says: {query}\n"
    "In two sentences, which of these vital signs are normal and which are not?"
)
# Grounded answers: the measured values and the clinician report are composed by code and shown
# above the advice, so the model is asked for the advice only, without numbers.
HEALTH_ANSWER = (
    "Vital signs from the user's wearables, and a medical expert's notes:\n{context}\n\n"
    "The user says: {query}\n"
    "The measured values are already shown to the user. In two or three sentences, give short "
    "personal advice: what to do now and when to see a doctor. Do not repeat the numbers."
)
CITY_ANSWER = (
    "Live readings from the city's sensors, and an expert's notes:\n{context}\n\n"
    "{query}. The risks and their numbers are already shown to the organisers. In two "
    "sentences, give one recommendation about the main risks. Do not repeat the numbers."
)


def render(step: PlanStep, query: str, outputs: dict[str, str]) -> str:
    """The prompt of `step`: its template filled with the query and its inputs' outputs."""
    context = "\n".join(f"[{name}] {outputs[name]}" for name in step.after if outputs.get(name))
    return step.prompt.format(query=query, context=context or "(no context)").strip()
