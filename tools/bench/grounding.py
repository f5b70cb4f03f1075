"""`edgecollab bench grounding`: are answers grounded in the data?

Scenarios (tools/bench/data/sensor_scenarios.jsonl, written apart from any prompt): devices of a
domain, the readings each publishes, a question, and by hand the abnormal streams with their
live (newest) value. Per scenario a fresh orchestrator (so earlier scenarios' devices are not
live for it) is started on a stack this bench owns: mosquitto, the classifier, one worker
(SmolLM2-135M by default; `--emulated` for one that writes nonsense words). The devices then
publish their readings as README "Plug in a device" shows (plain MQTT, no card), and the
question is asked. An answer is scored on its text alone, against the scenario file:

- named: every abnormal stream's name and live value (number and unit, any spelling) appear;
- unmeasured: the numbers with a unit in the text that no injected reading supports (a value,
  the mean, lowest or highest of a stream's readings, or the stream's documented threshold),
  nor a knowledge-base passage the answer cites (a range it retrieved: Answer.passages).

Printed (JSON): the fraction of answers naming every abnormal stream with its value, the number
of answers citing a value that was not measured, and how many answers had numbers the model
wrote removed by the orchestrator's check (Answer.unverified), with each scenario's answer.

`run_scenarios(mqtt, scenarios)` and `score(scenario, answer, tag)` are what `bench quality`
calls; the stack's other processes (classifier, worker) are the caller's to start.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiomqtt
import orjson

from schemas import Answer, Query
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.logging import configure_logging
from services.core.settings import MqttSettings, RuntimeSettings
from services.core.topics import QUERIES, READING
from services.data.grounding import Claim, claims
from services.data.streams import STREAMS, lookup
from tools import ROOT
from tools.common import print_json, running, spawn, stop
from tools.common.broker import LocalBroker

SCENARIOS = ROOT / "tools" / "bench" / "data" / "sensor_scenarios.jsonl"
SMOLLM2 = "SmolLM2-135M-Instruct"
MINILM = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class Abnormal:
    """A stream past its threshold, as the scenario's author wrote it."""

    device: str
    label: str
    value: float
    unit: str


@dataclass(frozen=True)
class Scenario:
    id: str
    domain: str
    question: str
    devices: dict[str, dict[str, tuple[str, list[float]]]]  # device -> stream -> (unit, values)
    abnormal: list[Abnormal]

    def stream_unit(self, stream: str) -> str:
        known = lookup(self.domain, stream)
        assert known is not None, f"{self.id}: unknown stream {stream}"
        return known.unit


def load(path: Path = SCENARIOS) -> list[Scenario]:
    """The scenarios of a JSON-lines file."""
    scenarios = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        raw = orjson.loads(line)
        devices = {
            d: {s: (unit, [float(v) for v in values]) for s, (unit, values) in streams.items()}
            for d, streams in raw["devices"].items()
        }
        abnormal = [Abnormal(d, label, float(v), unit) for d, label, v, unit in raw["abnormal"]]
        scenarios.append(Scenario(raw["id"], raw["domain"], raw["question"], devices, abnormal))
    return scenarios


@dataclass
class Score:
    """One scenario's answer, judged on its text against the scenario."""

    id: str
    domain: str  # as classified ('-' when no classification step)
    outcome: str
    named: bool  # every abnormal stream named with its live value
    missing: list[str] = field(default_factory=list)  # abnormal streams not named with value
    unmeasured: list[str] = field(default_factory=list)  # claims no injected reading supports
    removed: list[str] = field(default_factory=list)  # what the model wrote, removed (unverified)
    devices_used: list[str] = field(default_factory=list)  # data steps that succeeded
    ms: float = 0.0
    text: str = ""


def _close(claim: Claim, value: float) -> bool:
    return abs(claim.value - value) <= 0.5 * 10**-claim.decimals + 1e-9


def _measured(scenario: Scenario) -> dict[str, list[float]]:
    """Per canonical unit: every injected value, each stream's mean, and its threshold."""
    allowed: dict[str, list[float]] = {}
    for streams in scenario.devices.values():
        for stream, (_, values) in streams.items():
            unit = scenario.stream_unit(stream)
            allowed.setdefault(unit, []).extend([*values, sum(values) / len(values)])
            alert = STREAMS[(scenario.domain, stream)].alert
            if alert is not None:
                allowed[unit] += [t for t in (alert.above, alert.below) if t is not None]
    return allowed


def score(scenario: Scenario, answer: Answer, tag: str) -> Score:
    """Judge an answer's text against the scenario (device ids carry the run's `tag`)."""
    found = claims(answer.text)
    lower = answer.text.lower()
    missing = []
    for item in scenario.abnormal:
        written = f"{item.value:g} {item.unit}"
        unit = next((c.unit for c in claims(written)), item.unit)  # 'h' alone is no claim
        valued = written in answer.text or any(
            c.unit == unit and _close(c, item.value) for c in found
        )
        if not (valued and item.label.lower() in lower):
            missing.append(f"{item.device}: {item.label} {item.value:g} {item.unit}")
    allowed = _measured(scenario)
    for p in answer.passages:  # retrieved reference ranges, with their source
        allowed.setdefault(p.unit or "", []).extend(v for v in (p.low, p.high) if v is not None)
    unmeasured = [c.text for c in found if not any(_close(c, v) for v in allowed.get(c.unit, []))]
    classify = next((s for s in answer.steps if s.name == "classify"), None)
    return Score(
        id=scenario.id,
        domain=(classify.detail or "-").split(" ")[0] if classify else "-",
        outcome=answer.outcome,
        named=not missing,
        missing=missing,
        unmeasured=list(dict.fromkeys(unmeasured)),
        removed=list(answer.unverified),
        devices_used=[
            (s.agent or "").removesuffix(f"-{tag}")
            for s in answer.steps
            if s.name.startswith("data:") and s.outcome == "ok"
        ],
        ms=answer.ms,
        text=answer.text,
    )


def summary(scores: Sequence[Score]) -> dict[str, object]:
    n = len(scores)
    return {
        "scenarios": n,
        "named_every_abnormal_value": round(sum(s.named for s in scores) / n, 3) if n else None,
        "answers_citing_unmeasured_values": sum(bool(s.unmeasured) for s in scores),
        "answers_where_model_numbers_were_removed": sum(bool(s.removed) for s in scores),
        "misclassified": [s.id for s in scores if s.domain not in ("health", "environment")],
    }


async def publish_readings(broker: LocalBroker, scenario: Scenario, tag: str) -> None:
    """Each device's readings, one a second ending now, as a plain MQTT client with the
    device's own account (QoS 1: the broker has passed each on before the question is asked)."""
    now = int(time.time())
    for device, streams in scenario.devices.items():
        agent = f"{device}-{tag}"
        mqtt = broker.login(agent, "sensor")
        async with aiomqtt.Client(
            mqtt.host, mqtt.port, identifier=agent, username=agent, password=mqtt.secret()
        ) as client:
            for stream, (unit, values) in streams.items():
                topic = READING.format(domain=scenario.domain, stream=stream, agent=agent)
                for i, value in enumerate(values):
                    body = {"v": 1, "type": "reading", "agent": agent, "domain": scenario.domain,
                            "stream": stream, "value": value, "unit": unit,
                            "ts": now - (len(values) - 1 - i)}  # fmt: skip
                    await client.publish(topic, orjson.dumps(body), qos=1)


async def run_scenarios(
    broker: LocalBroker,
    scenarios: Sequence[Scenario],
    *,
    max_tokens: int = 96,
    deadline_s: float = 180.0,
    online_timeout_s: float = 60.0,
) -> list[Score]:
    """Each scenario on the running stack on `broker` (a classifier and workers online), with
    an orchestrator of its own; returns the scores in order."""
    tag = uuid.uuid4().hex[:6]
    client = f"bench-grounding-{tag}"
    bus = Bus(settings=broker.login(client), client_id=client, service="bench")
    view = CmsView(bus)
    scores = []
    async with running(bus):
        for number, scenario in enumerate(scenarios):
            run_tag = f"{tag}{number}"
            orchestrator = f"bench-orch-{run_tag}"
            argv = [sys.executable, "-m", "services.orchestrator", "--agent-id", orchestrator]
            proc = spawn(argv, broker.login(orchestrator, "orchestrator"), state_dir=broker.workdir)
            try:
                if not await view.wait_online([orchestrator], timeout=online_timeout_s):
                    raise SystemExit(f"bench grounding: {orchestrator} did not come online")
                await publish_readings(broker, scenario, run_tag)
                query = Query(
                    request_id=f"grounding-{run_tag}",
                    text=scenario.question,
                    max_tokens=max_tokens,
                    deadline=time.time() + deadline_s,
                )
                reply = await bus.request(QUERIES.format(), query, deadline=query.deadline)
                assert isinstance(reply, Answer)
                scores.append(score(scenario, reply, run_tag))
            finally:
                stop(proc)
    return scores


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("grounding", help="answers name the measured values, and only those")
    parser.add_argument("--scenarios", type=Path, default=SCENARIOS, help="a JSON-lines file")
    parser.add_argument("--only", action="append", help="scenario id (repeatable)")
    parser.add_argument("--model", default=SMOLLM2, help=f"worker model folder ({SMOLLM2})")
    parser.add_argument("--emulated", action="store_true", help="an emulated worker instead")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


async def bench(args: argparse.Namespace) -> int:
    configure_logging("bench", level="warning")
    scenarios = [s for s in load(args.scenarios) if not args.only or s.id in args.only]
    models = RuntimeSettings().models_dir
    domains = '["health","environment","general"]'
    worker = ["--backend", "emulated", "--tokens-per-s", "200"]
    if not args.emulated:
        worker = ["--backend", "onnx", "--model-dir", str(models / args.model)]
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp))
        broker.start()
        tag = uuid.uuid4().hex[:6]
        cls, slm = f"bench-cls-{tag}", f"bench-slm-{tag}"
        procs = [
            spawn([sys.executable, "-m", "services.classifier", "--agent-id", cls,
                   "--model-dir", str(models / MINILM)], broker.login(cls, "classifier"),
                  state_dir=broker.workdir),
            spawn([sys.executable, "-m", "services.worker", "--agent-id", slm,
                   *worker, "--domains", domains], broker.login(slm, "worker"),
                  state_dir=broker.workdir),
        ]  # fmt: skip
        try:
            waiter = f"bench-wait-{tag}"
            await _wait_online(broker.login(waiter), waiter, [cls, slm])
            started = time.time()
            scores = await run_scenarios(broker, scenarios, max_tokens=args.max_tokens)
        finally:
            stop(*procs)
            broker.stop()
    result = summary(scores) | {
        "worker": "emulated" if args.emulated else args.model,
        "seconds": round(time.time() - started, 1),
        "answers": [asdict(s) for s in scores],
    }
    print_json(result)
    return 0


async def _wait_online(mqtt: MqttSettings, client_id: str, agents: list[str]) -> None:
    bus = Bus(settings=mqtt, client_id=client_id, service="bench")
    view = CmsView(bus)
    async with running(bus):
        if not await view.wait_online(agents, timeout=180):
            raise SystemExit(f"bench grounding: not online within 180 s: {agents}")
