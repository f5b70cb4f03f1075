"""The Task Orchestrator: classify a query, plan it, run the plan's steps, answer.

Independent steps of a phase run in parallel, phases in sequence; every step has a deadline.
A failed data or knowledge step leaves the answer partial; the final generation decides the
outcome (edge, cloud, rejected, failed), counted the same way as the simulator counts it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import structlog

from schemas import Answer, Classification, ClassifyRequest, Query, Step
from services.core import cms
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, RemoteError
from services.core.topics import CLASSIFY, INFERENCE_STATE, METRIC, QUERIES, REPLIES
from services.orchestrator.cooperation import Cooperation
from services.orchestrator.dispatch import Dispatcher, Generated, Job
from services.orchestrator.planner import Plan, PlanStep, Sensor, make_plan, render
from services.orchestrator.provenance import record
from services.orchestrator.tenants import Tenants
from services.scheduling.outcomes import Outcome, Tally

log = structlog.get_logger("edgecollab.orchestrator")

LATENCY_WINDOW = 10_000  # latencies kept for the metrics' percentiles
CLASSIFY_TIMEOUT_S = 2.0
DATA_STEP_S = 3.0  # a sensor publishes at least this often when alive
STATE_EXPIRY_S = 300.0  # cms/inference/<request>/... outlives its request by this much


class Orchestrator:
    """Plans each query over the CMS view and runs it on edge agents (else the cloud)."""

    def __init__(
        self,
        *,
        bus: Bus,
        view: CmsView,
        dispatcher: Dispatcher,
        cooperation: Cooperation,
        tenants: Tenants | None = None,
    ) -> None:
        self.bus = bus
        self.view = view
        self.dispatcher = dispatcher
        self.cooperation = cooperation
        self.tenants = tenants
        self.tally = Tally(latencies_s=deque(maxlen=LATENCY_WINDOW))  # type: ignore[arg-type]
        bus.serve(QUERIES, self.handle_query, shared="orchestrators")

    async def handle_query(self, request: Request[Query]) -> Answer:
        query = request.body
        client = requester(request.reply_to)
        # a tenant at its quota is refused here, before any generation (Error code quota)
        tenant = self.tenants.admit(client, query) if self.tenants is not None else None
        started, since = time.perf_counter(), time.time()
        steps: list[Step] = []
        classification = await self._classify(query, steps)
        plan = self.plan(query, classification)
        outputs: dict[str, str] = {}
        final: Generated | None = None
        for number, phase in enumerate(plan.phases()):
            runs = [self._run(s, query, outputs, since, client) for s in phase]
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
        answer = self._answer(query, started, final, steps, partial)
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
        experts = [a for a in self.view.agents("worker") if a.online and domain in a.card.domains]
        return make_plan(
            domain=domain,
            max_tokens=query.max_tokens,
            sensors=sensors,
            expert_available=bool(experts) and domain != "general",
        )

    async def _run(
        self,
        step: PlanStep,
        query: Query,
        outputs: dict[str, str],
        since: float,
        client: str | None = None,
    ) -> tuple[str | None, list[Step], Generated | None]:
        """One step: its output text (None if it failed), its records, and the generation."""
        if step.kind == "data":
            deadline = min(query.deadline, time.time() + DATA_STEP_S)
            text, record = await self.cooperation.sense(step, since, deadline)
            return text, [record], None
        prompt = render(step, query.text, outputs)
        if step.kind == "knowledge":
            text, record = await self.cooperation.ask(
                step, prompt, request_id=query.request_id, deadline=query.deadline
            )
            return text, [record], None
        job = Job(
            request_id=query.request_id,
            name=step.name,
            prompt=prompt,
            max_tokens=step.max_tokens,
            deadline=query.deadline,
            stream=query.stream and step.name == "answer",
            sampling=query.sampling,
            client=client,
        )
        generated = await self.dispatcher.run(job)
        return generated.text, generated.steps, generated

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
        self, query: Query, started: float, final: Generated, steps: list[Step], partial: bool
    ) -> Answer:
        seconds = time.perf_counter() - started
        cost = sum(s.cost_usd for s in steps)
        answered = final.text is not None
        self.tally.record(final.outcome, latency_s=seconds if answered else None, cost_usd=cost)
        text = final.text if answered else _refusal(final, steps)
        return Answer(
            request_id=query.request_id,
            text=text or "",
            outcome=final.outcome.value,
            partial=partial,
            steps=steps,
            ms=round(seconds * 1000, 3),
            cost_usd=round(cost, 8),
        )

    async def _record_phase(
        self, request_id: str, number: int, phase: list[PlanStep], outputs: dict[str, str]
    ) -> None:
        """Task state while a plan runs: cms/inference/<request>/phase_<n>_output."""
        key = INFERENCE_STATE.format(task=request_id, field=f"phase_{number}_output")
        value = {s.name: outputs.get(s.name, "")[:500] for s in phase}
        await cms.put(self.bus, key, value, version=number + 1, expiry_s=STATE_EXPIRY_S)

    async def publish_metrics(self, *, base_version: int, interval_s: float = 5.0) -> None:
        """cms/metrics/<orchestrator>/requests: outcome counts, cloud spend, latency, cache.

        Versions continue the agent's own (epoch x 10^6 + n), so a restarted orchestrator's
        first summary supersedes its last one from before, for every merge by version."""
        key = METRIC.format(scope=self.bus.client_id, name="requests")
        version, last = base_version, -1
        while True:
            await asyncio.sleep(interval_s)
            if self.tally.requests != last and self.bus.connected.is_set():
                version, last = version + 1, self.tally.requests
                summary = self.tally.summary() | {
                    "policy": self.dispatcher.allocator.policy.name,
                    "knowledge_cache_hits": self.cooperation.cache_hits,
                    "knowledge_cache_misses": self.cooperation.cache_misses,
                }
                await cms.put(self.bus, key, summary, version=version)


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
