"""The Task Orchestrator: classify a query, plan it, run the plan's steps, answer.

Independent steps of a phase run in parallel, phases in sequence; every step has a deadline.
A failed data, knowledge or program step leaves the answer partial; the final generation decides
the outcome (edge, cloud, rejected, failed), counted the same way as the simulator counts it. A
fallback step (the plain generation after a program) answers with its origin's output when that
one succeeded, and says it is the fallback when it runs.

Sensors of a plan: the online sensor agents of its domain in the CMS, and devices discovered
from their data (heard publishing readings of the domain in the last `DEVICE_FRESH_S`, with no
card in the CMS). A plan with data steps is answered grounded: the measured part and the
clinician report are composed from the readings' facts, the model's advice is checked against
them (services/data/grounding.py), and the final generation is not streamed, since what a
model writes is only shown once checked.

Knowledge gaps: a plain answer whose plan names a `gap_domain` (an expert declares it) gets a
second opinion. With a lexicon of that domain online (a knowledge base whose card `checks` it),
the expert is always asked the question on knowledge/<gap_domain>/ask, and the lexicon says on
knowledge/<gap_domain>/check which of the two answers its entries support; when it cannot tell,
the expert's answer is the answer. Without one, the worker's `confidence` (how sure its model
was of its first tokens) decides: below `gap_confidence` the expert is asked and its answer is
the answer. The general step keeps its own answer (`output`) in the provenance. Such an answer
is not streamed, since the general model's text may not be the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import structlog

from schemas import (
    Answer,
    Classification,
    ClassifyRequest,
    Fact,
    Passage,
    Query,
    SamplingOptions,
    Step,
)
from services.core import cms
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, RemoteError
from services.core.topics import CLASSIFY, INFERENCE_STATE, METRIC, QUERIES, REPLIES
from services.data import grounding
from services.data.view import DEVICE_FRESH_S
from services.orchestrator.cooperation import Cooperation
from services.orchestrator.dispatch import Dispatcher, Generated, Job
from services.orchestrator.planner import (
    Plan,
    PlanStep,
    Sensor,
    make_plan,
    render,
    with_passages,
)
from services.orchestrator.programs import Programs
from services.orchestrator.provenance import record
from services.orchestrator.tenants import Tenants
from services.scheduling.outcomes import Outcome, Tally

log = structlog.get_logger("edgecollab.orchestrator")

LATENCY_WINDOW = 10_000  # latencies kept for the metrics' percentiles
CLASSIFY_TIMEOUT_S = 2.0
DATA_STEP_S = 3.0  # a sensor publishes at least this often when alive
STATE_EXPIRY_S = 300.0  # cms/inference/<request>/... outlives its request by this much
PROGRAM_WRITERS = ("math", "code")  # expert domains asked for programs, in this order
# Below this confidence a general answer shows a gap: the threshold `edgecollab bench gap` chose on
# half of the facts set for SmolLM2-135M, Qwen2.5-Coder the expert (docs/results/gap.json).
GAP_CONFIDENCE = 0.34


class Orchestrator:
    """Plans each query over the CMS view and runs it on edge agents (else the cloud)."""

    def __init__(
        self,
        *,
        bus: Bus,
        view: CmsView,
        dispatcher: Dispatcher,
        cooperation: Cooperation,
        programs: Programs | None = None,
        tenants: Tenants | None = None,
        gap_confidence: float = GAP_CONFIDENCE,
    ) -> None:
        self.bus = bus
        self.gap_confidence = gap_confidence  # 0: never ask on a gap
        self.view = view
        self.dispatcher = dispatcher
        self.cooperation = cooperation
        self.programs = programs or Programs(
            bus=bus, dispatcher=dispatcher, cooperation=cooperation
        )
        self.tenants = tenants
        self.tally = Tally(latencies_s=deque(maxlen=LATENCY_WINDOW))  # type: ignore[arg-type]
        bus.serve(QUERIES, self.handle_query, shared="orchestrators")

    async def handle_query(self, request: Request[Query]) -> Answer:
        query = request.body
        client = requester(request.reply_to)
        # a tenant at its quota is refused here, before any generation (Error code quota)
        tenant = self.tenants.admit(client, query) if self.tenants is not None else None
        started, since = time.perf_counter(), time.time()
        if query.ack:  # the client now watches us, and sends the query again if we die
            await self.bus.acknowledge(request)
        steps: list[Step] = []
        classification = await self._classify(query, steps)
        plan = self.plan(query, classification)
        if plan.sensed or plan.final.gap_domain:  # grounded, or maybe an expert's answer
            query = query.model_copy(update={"stream": False})
        outputs: dict[str, str] = {}
        facts: dict[str, list[Fact]] = {}
        passages: dict[str, list[Passage]] = {}
        final: Generated | None = None
        for number, phase in enumerate(plan.phases()):
            runs = [
                self._run(s, query, outputs, since, facts, passages, classification, client)
                for s in phase
            ]
            results = [await runs[0]] if len(runs) == 1 else await asyncio.gather(*runs)
            for step, (text, records, generated) in zip(phase, results, strict=True):
                steps += records
                if text is not None:
                    outputs[step.name] = text
                final = generated if step is plan.final else final
            if len(plan.steps) > 1:
                await self._record_phase(query.request_id, number, phase, outputs)
        assert final is not None
        partial = any(s.outcome == "failed" for s in steps if s.name != plan.final.name)
        measured = [f for s in plan.sensed for f in facts.get(s.name, [])]
        found = [p for ps in passages.values() for p in ps]
        answer = self._answer(query, started, final, steps, partial, plan, measured, found)
        if tenant is not None and self.tenants is not None:
            await self.tenants.charge(tenant, client, query, answer)
        return answer

    def plan(self, query: Query, classification: Classification | None) -> Plan:
        """The plan for this query given the agents online now."""
        if classification is None:
            return make_plan(domain="general", max_tokens=query.max_tokens)
        domain = classification.domain
        sensors = [
            Sensor(a.card.agent, domain)
            for a in self.view.agents("sensor")
            if a.online and domain in a.card.domains
        ]
        sensors += [  # devices that joined by publishing (README "Plug in a device")
            Sensor(agent, domain, max_age_s=DEVICE_FRESH_S)
            for agent in self.cooperation.data.live(domain, within_s=DEVICE_FRESH_S)
            if agent not in self.view.cards
        ]
        workers = [a for a in self.view.agents("worker") if a.online]
        experts = [a for a in workers if domain in a.card.domains]
        writer = next(
            (d for d in PROGRAM_WRITERS if any(d in a.card.domains for a in workers)), None
        )
        declared = {d for a in workers for d in a.card.domains}
        gap = next(  # the query's sub-labels, then its domain: an expert for a gap
            (d for d in (*classification.sub_labels, domain) if d != "general" and d in declared),
            None,
        )
        plan = make_plan(
            domain=domain,
            max_tokens=query.max_tokens,
            sensors=sensors,
            expert_available=bool(experts) and domain != "general",
            sandbox_available=any(a.online for a in self.view.agents("sandbox")),
            program_writer=writer,
            gap_domain=gap if self.gap_confidence > 0 else None,
        )
        bases = (a for a in self.view.agents("kb") if a.online and domain in a.card.domains)
        return with_passages(plan) if any(bases) else plan

    async def _run(
        self,
        step: PlanStep,
        query: Query,
        outputs: dict[str, str],
        since: float,
        facts: dict[str, list[Fact]],
        passages: dict[str, list[Passage]],
        classification: Classification | None = None,
        client: str | None = None,
    ) -> tuple[str | None, list[Step], Generated | None]:
        """One step: its output text (None if it failed), its records, and the generation;
        a data step's facts go to `facts` under its name, a retrieve step's passages to
        `passages`."""
        if step.kind == "retrieve":
            text, record, passages[step.name] = await self.cooperation.retrieve(
                step, query.text, request_id=query.request_id, deadline=query.deadline
            )
            return text, [record], None
        if step.kind == "data":
            deadline = min(query.deadline, time.time() + DATA_STEP_S)
            text, record, facts[step.name] = await self.cooperation.sense(step, since, deadline)
            return text, [record], None
        if step.kind == "program":
            text, records = await self.programs.run(step, query)
            return text, records, None
        done = outputs.get(step.fallback_of) if step.fallback_of else None
        if done is not None:  # what the fallback stands in for succeeded: that is the output
            return done, [], Generated(done, Outcome.EDGE)
        prompt = render(step, query.text, outputs)
        if step.kind == "knowledge":
            text, record = await self.cooperation.ask(
                step, prompt, request_id=query.request_id, deadline=query.deadline,
                sampling=step.sampling,
            )  # fmt: skip
            return text, [record], None
        job = Job(
            request_id=query.request_id,
            name=step.name,
            prompt=prompt,
            max_tokens=step.max_tokens,
            deadline=query.deadline,
            stream=query.stream and step.name == "answer",
            resume=query.resume if step.name == "answer" else None,
            sampling=under(step.sampling, query.sampling),
            **_length_labels(step, classification),
            client=client,
        )
        generated = await self.dispatcher.run(job)
        if step.gap_domain and generated.text is not None:
            return await self._second_opinion(step, query, generated)
        if step.fallback_of and generated.steps:
            note = f"fallback: a plain generation, as {step.fallback_of} gave no answer"
            last = generated.steps[-1]
            detail = f"{note}; {last.detail}" if last.detail else note
            generated.steps[-1] = last.model_copy(update={"detail": detail})
        return generated.text, generated.steps, generated

    def _gap(self, generated: Generated, domain: str, lexicon: bool) -> str | None:
        """Why the answer needs the expert of `domain` (None: it does not): a `lexicon` of the
        domain is online to judge, or the answer's confidence is below the threshold. Never when
        its writer is an expert of `domain` itself (busy general workers leave a question to the
        expert now and then)."""
        writer = self.view.cards.get(generated.steps[-1].agent or "")
        if writer is not None and domain in writer.domains:
            return None
        if lexicon:
            return f"second opinion: {domain} answers are checked against the lexicon"
        if generated.confidence is not None and generated.confidence < self.gap_confidence:
            return f"gap: confidence {generated.confidence:.2f} below {self.gap_confidence:.2f}"
        return None

    def _lexicon(self, domain: str) -> bool:
        return any(a.online and domain in a.card.checks for a in self.view.agents("kb"))

    async def _second_opinion(
        self, step: PlanStep, query: Query, generated: Generated
    ) -> tuple[str | None, list[Step], Generated]:
        """Ask the gap domain's expert when the answer needs it (`_gap`); the answer is the one
        the lexicon supports, else the expert's. The general answer stays in the provenance (or
        stands, when the expert gives none)."""
        assert step.gap_domain is not None and generated.text is not None
        lexicon = self._lexicon(step.gap_domain)
        why = self._gap(generated, step.gap_domain, lexicon)
        if why is None:
            return generated.text, generated.steps, generated
        ask = PlanStep(
            f"knowledge:{step.gap_domain}", "knowledge", domain=step.gap_domain,
            prompt="{query}", max_tokens=step.max_tokens,
        )  # fmt: skip
        text, asked = await self.cooperation.ask(
            ask, query.text, request_id=query.request_id, deadline=query.deadline
        )
        general = generated.steps[-1]
        if text is None:
            note = f"{why}; {ask.name} gave no answer, this one stands"
            steps = [*generated.steps[:-1], general.model_copy(update={"detail": note}), asked]
            return generated.text, steps, generated
        checked: list[Step] = []
        best: int | None = None
        if lexicon:
            both = [
                (general.agent or "the general", generated.text),
                (asked.agent or "the expert", text),
            ]
            best, verdict = await self.cooperation.check(
                step.gap_domain, query.text, both,
                request_id=query.request_id, deadline=query.deadline,
            )  # fmt: skip
            checked.append(verdict)
        chosen, writer = (generated.text, general.agent) if best == 0 else (text, asked.agent)
        note = f"{why}; the answer is {writer}'s"
        second = f"asked for {general.agent}'s answer"
        steps = [
            *generated.steps[:-1],
            general.model_copy(update={"detail": note, "output": generated.text}),
            asked.model_copy(update={"detail": second, "output": text}),
            *checked,
        ]
        return chosen, steps, Generated(chosen, generated.outcome, steps, generated.confidence)

    async def _classify(self, query: Query, steps: list[Step]) -> Classification | None:
        """The Classifier Engine's view of the query; None when no classifier is online."""
        classifiers = (a for a, card in self.view.cards.items() if card.kind == "classifier")
        if not any(self.view.online(a) for a in classifiers):
            return None
        started = time.perf_counter()
        request = ClassifyRequest(request_id=query.request_id, text=query.text)
        deadline = min(query.deadline, time.time() + CLASSIFY_TIMEOUT_S)
        try:
            reply = await self.bus.request(CLASSIFY.format(), request, deadline=deadline)
        except (DeadlineExceeded, RemoteError) as exc:
            steps.append(
                record("classify", CLASSIFY.format(), None, started, "failed", detail=str(exc))
            )
            return None
        assert isinstance(reply, Classification)
        detail = f"{reply.domain} ({reply.confidence:.2f}), {reply.complexity.difficulty}"
        steps.append(
            record("classify", CLASSIFY.format(), reply.agent, started, "ok", detail=detail)
        )
        return reply

    def _answer(
        self,
        query: Query,
        started: float,
        final: Generated,
        steps: list[Step],
        partial: bool,
        plan: Plan,
        facts: list[Fact],
        passages: list[Passage],
    ) -> Answer:
        seconds = time.perf_counter() - started
        cost = sum(s.cost_usd for s in steps)
        answered = final.text is not None
        self.tally.record(final.outcome, latency_s=seconds if answered else None, cost_usd=cost)
        text = final.text if answered else _refusal(final, steps)
        verified, unverified = None, []
        cited = grounding.cited(facts, passages)
        if plan.sensed:  # the measured part from the readings, the model's advice checked
            checked = grounding.check(final.text or "", facts, passages)
            verified, unverified = checked.verified, checked.unverified
            text = grounding.compose(
                plan.domain,
                facts,
                advice=checked.text,
                removed=checked.removed,
                report=plan.domain == "health" and bool(facts),
                missing=None if answered else text,
                passages=passages,
            )
        elif answered and cited:  # the model's numbers checked against what was retrieved
            checked = grounding.check(text or "", [], cited)
            verified, unverified = checked.verified, checked.unverified
            text = grounding.quoted(checked.text, cited, removed=checked.removed)
        return Answer(
            request_id=query.request_id,
            text=text or "",
            outcome=final.outcome.value,
            partial=partial,
            steps=steps,
            ms=round(seconds * 1000, 3),
            cost_usd=round(cost, 8),
            facts=facts,
            verified=verified,
            unverified=unverified,
            passages=cited,
        )

    async def _record_phase(
        self, request_id: str, number: int, phase: list[PlanStep], outputs: dict[str, str]
    ) -> None:
        """Task state while a plan runs: cms/inference/<request>/phase_<n>_output."""
        key = INFERENCE_STATE.format(task=request_id, field=f"phase_{number}_output")
        value = {s.name: outputs.get(s.name, "")[:500] for s in phase}
        await cms.put(self.bus, key, value, version=number + 1, expiry_s=STATE_EXPIRY_S)

    async def publish_metrics(self, *, base_version: int, interval_s: float = 5.0) -> None:
        """cms/metrics/<orchestrator>/requests: outcome counts, cloud spend, latency, cache
        (each worker writes its own cms/metrics/<agent>/...).

        Versions continue the agent's own (epoch x 10^6 + n), so a restarted orchestrator's
        first summary supersedes its last one from before, for every merge by version."""
        key = METRIC.format(scope=self.bus.client_id, name="requests")
        version, last = base_version, -1

        async def republish() -> None:  # after a broker restart, what we own comes back
            nonlocal last
            last = -1

        self.bus.on_connect(republish)
        while True:
            await asyncio.sleep(interval_s)
            if not self.bus.connected.is_set():
                continue
            if self.tally.requests != last:
                version, last = version + 1, self.tally.requests
                summary = self.tally.summary() | {
                    "policy": self.dispatcher.allocator.policy.name,
                    "knowledge_cache_hits": self.cooperation.cache_hits,
                    "knowledge_cache_misses": self.cooperation.cache_misses,
                }
                await cms.put(self.bus, key, summary, version=version)


def _length_labels(step: PlanStep, classification: Classification | None) -> dict[str, str]:
    """What predicts a generation's length: the query's domain (with the step's name for a
    step other than the answer, e.g. `health:analysis`) and difficulty."""
    if classification is None:
        return {}
    domain = classification.domain
    return {
        "domain": domain if step.name == "answer" else f"{domain}:{step.name}",
        "difficulty": classification.complexity.difficulty,
    }


def requester(reply_to: str | None) -> str | None:
    """The client a request came from: the owner of its response topic, replies/<client>
    (the broker lets only that client read it)."""
    params = REPLIES.match(reply_to) if reply_to else None
    return params["client"] if params else None


def _refusal(final: Generated, steps: list[Step]) -> str:
    reason = next((s.detail for s in reversed(steps) if s.detail), "no edge agent served it")
    if final.outcome is Outcome.REJECTED:
        return f"rejected: {reason}; no cloud endpoint is configured"
    return f"failed: {reason}"


def under(step: SamplingOptions | None, query: SamplingOptions) -> SamplingOptions:
    """The step's decoding where the query set nothing (what the user asks wins)."""
    if step is None:
        return query
    return SamplingOptions(**(step.model_dump(exclude_defaults=True)
                              | query.model_dump(exclude_defaults=True)))  # fmt: skip
