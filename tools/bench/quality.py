"""`edgecollab bench quality`: how often the stack answers right, the general model alone vs the
cooperating stack.

The labelled set is `tools/bench/data/quality/` (written for this bench, apart from any prompt
or training data): `code.jsonl` (Python functions, each with asserts), `math.jsonl` (word
problems with numeric answers), `facts.jsonl` (questions with their accepted answers) and
`sensors.jsonl` (questions about a wearable's or the city's readings, with the readings to
inject and what the answer must mention). `--data DIR` asks another folder's sets instead:
`tools/bench/data/dev/facts.jsonl` (the facts the lexicon's rules were chosen on) and
`tools/bench/data/unseen/facts.jsonl` (written before those rules were fixed, run once after).

Each stack gets its own mosquitto and the processes `edgecollab up` starts, with the command
lines of `tools/common/stack.py` and the models in `models/`; questions are asked one at a time
through the QueryClient, as `edgecollab ask` asks them:

- **alone**: the orchestrator, the classifier and one general worker (`--model`, SmolLM2) that
  declares no expert domain; no sandbox, no code expert, no sensors (a sensor question is
  asked with no readings behind it).
- **cooperating**: the orchestrator, the classifier, every worker, sandbox and knowledge base
  (with its lexicon) of the stack,
  plus a code expert (`--code-model`, Qwen2.5-Coder, domains code, math and facts) when the
  stack has none; for each sensor scenario a sensor agent of this bench's own publishes the
  readings.

Grading: **code**: the function taken from the answer (the first Python block defining it,
else the text from its `def` line on) runs with its asserts in the sandbox that serves the
stack (`services/sandbox/runner.py`); **math**: the last number in the answer equals the
label; **facts**: one accepted answer appears in the normalised answer, as whole words;
**sensors**: every expected group has a member in the answer (a minimal check; see
`check_sensor_answer`). Printed as JSON per stack and domain: items, correct, accuracy, p50
latency as the client sees it, failures (no answer), and the paths the answers took.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import textwrap
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas import AgentCard, Answer, Query, Reading, now
from services.core.bus import Bus
from services.core.client import QueryClient
from services.core.cms import CmsView
from services.core.errors import EdgecollabError
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.topics import READING
from services.data.streams import lookup
from services.orchestrator.programs import PYTHON_TAGS, code_blocks
from services.sandbox.runner import Limits, Sandbox
from tools import ROOT
from tools.bench.gap import auroc
from tools.common import print_json, running, spawn, stop
from tools.common.broker import LocalBroker
from tools.common.stack import STACK, ServiceSpec

DATA = Path(__file__).parent / "data" / "quality"
DOMAINS = ("code", "math", "facts", "sensors")
MAX_TOKENS = {"code": 256, "math": 160, "facts": 64, "sensors": 160}
ANSWER_CHARS = 600  # of each answer kept in --details
PASSED = "all asserts passed"
READING_EVERY_S = 0.5  # an injected sensor publishes this often while its question is asked
STACK_MODULES = ("services.orchestrator", "services.classifier", "services.worker",
                 "services.sandbox", "services.kb")  # fmt: skip


class _Item(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str


class CodeItem(_Item):
    prompt: str
    function: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    asserts: list[str] = Field(min_length=1)


class MathItem(_Item):
    question: str
    answer: float


class FactItem(_Item):
    question: str
    answers: list[str] = Field(min_length=1)


class SensorItem(_Item):
    domain: Literal["health", "environment"]
    question: str
    readings: dict[str, float] = Field(min_length=1)
    expect: list[list[str]] = Field(min_length=1)


ITEMS: dict[str, type[_Item]] = {
    "code": CodeItem,
    "math": MathItem,
    "facts": FactItem,
    "sensors": SensorItem,
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quality", help="answer quality: the general model alone vs the cooperating stack"
    )
    parser.add_argument("--stack", choices=("alone", "cooperating", "both"), default="both")
    parser.add_argument("--limit", type=int, metavar="N", help="the first N items per domain")
    parser.add_argument("--domain", action="append", choices=DOMAINS, help="repeatable; all")
    parser.add_argument(
        "--model", default="SmolLM2-135M-Instruct", help="the general worker's model folder"
    )
    parser.add_argument(
        "--code-model", default="Qwen2.5-Coder-0.5B-Instruct",
        help="the code expert's model folder when the stack has none; 'none': no code expert",
    )  # fmt: skip
    parser.add_argument("--classifier-model", default="all-MiniLM-L6-v2")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per question")
    parser.add_argument("--details", action="store_true", help="every item's answer and grade")
    parser.add_argument(
        "--regrade", type=Path, metavar="JSON",
        help="grade the answers of a stored --details run again (after a grader fix); asks nothing",
    )  # fmt: skip
    parser.add_argument(
        "--data", type=Path, default=DATA,
        help="a folder of <domain>.jsonl sets (e.g. tools/bench/data/unseen)",
    )  # fmt: skip
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


def load(domain: str, limit: int | None = None, folder: Path = DATA) -> list[_Item]:
    """The labelled items of `domain` (the first `limit`)."""
    model = ITEMS[domain]
    lines = (folder / f"{domain}.jsonl").read_text().splitlines()
    items = [model.model_validate_json(line) for line in lines if line.strip()]
    return items[:limit] if limit is not None else items


async def bench(args: argparse.Namespace) -> int:
    configure_logging("bench", level="warning")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("bench quality: --limit must be at least 1")
    sandbox = await Sandbox.detect()
    if args.regrade is not None:
        print_json(await regrade(args.regrade, sandbox))
        return 0
    domains = args.domain or list(DOMAINS)
    missing = [d for d in domains if not (args.data / f"{d}.jsonl").is_file()]
    if missing:
        raise SystemExit(f"bench quality: {args.data} has no {', '.join(missing)} set")
    items = {d: load(d, args.limit, args.data) for d in domains}
    os.environ.setdefault("EDGECOLLAB_MODELS_DIR", str(ROOT / "models"))  # as `up` does
    kinds = ("alone", "cooperating") if args.stack == "both" else (args.stack,)
    report: dict[str, object] = {
        "data": str(args.data),
        "limit": args.limit,
        "items": {d: len(v) for d, v in items.items()},
        "max_tokens": {d: MAX_TOKENS[d] for d in domains},
        "stacks": {},
    }
    for kind in kinds:
        specs = stack_specs(kind, args)
        print(f"quality: {kind}: {', '.join(s.name for s in specs)} ...", file=sys.stderr)
        report["stacks"][kind] = await _run_stack(kind, specs, items, args, sandbox)  # type: ignore[index]
    print_json(report)
    return 0


async def regrade(stored_path: Path, sandbox: Sandbox) -> dict[str, Any]:
    """A stored `--details` report with every answer graded again by today's grader; an answer
    stored cut (at ANSWER_CHARS) keeps its grade."""
    try:
        stored: dict[str, Any] = json.loads(stored_path.read_text())
        data = Path(stored.get("data", DATA))
        for stack in stored["stacks"].values():
            for domain, summary in stack["domains"].items():
                if "items" not in summary:
                    raise SystemExit(f"bench quality: {stored_path} has no answers (--details)")
                items = {item.id: item for item in load(domain, None, data)}
                for g in summary["items"]:
                    for field in ("answer", "general_answer", "expert_answer"):
                        text = g.get(field)
                        if text and len(text) < ANSWER_CHARS and g["answered"]:
                            right = await grade(items[g["id"]], text, sandbox)
                            g[field.replace("answer", "correct")] = right
                stack["domains"][domain] = _summary(summary["items"], details=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"bench quality: cannot regrade {stored_path}: {exc!r}") from None
    return stored


def stack_specs(kind: str, args: argparse.Namespace) -> list[ServiceSpec]:
    """The services of the `alone` or `cooperating` stack, as STACK starts them."""
    by_name = {s.name: s for s in STACK}
    classifier = _with(by_name["classifier"], "--model-dir", args.classifier_model)
    general = _with(by_name["worker-1"], "--model-dir", args.model)
    if kind == "alone":
        return [by_name["orchestrator"], classifier, _with(general, "--domains", "[]")]
    chosen = [s for s in STACK if s.module in STACK_MODULES]
    specs = [{"classifier": classifier, "worker-1": general}.get(s.name, s) for s in chosen]
    has_coder = any("code" in _arg(s, "--domains") for s in specs if s.module == "services.worker")
    if not has_coder and args.code_model != "none":
        specs.append(
            ServiceSpec(
                "code-1", "services.worker",
                ("--agent-id", "code-1", "--backend", "onnx", "--model-dir", args.code_model,
                 "--concurrency", "2", "--domains", '["code","math","facts"]'),
            )
        )  # fmt: skip
    return specs


def _arg(spec: ServiceSpec, flag: str) -> str:
    args = list(spec.args)
    return args[args.index(flag) + 1] if flag in args else ""


def _with(spec: ServiceSpec, flag: str, value: str) -> ServiceSpec:
    args = list(spec.args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return ServiceSpec(spec.name, spec.module, tuple(args))


async def _run_stack(
    kind: str,
    specs: list[ServiceSpec],
    items: dict[str, list[_Item]],
    args: argparse.Namespace,
    sandbox: Sandbox,
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp))
        broker.start()
        procs = [
            spawn(s.local_command(), broker.login(s.agent, s.role), state_dir=broker.workdir)
            for s in specs
        ]
        try:
            results = await _ask_all(kind, broker, specs, items, args, sandbox, procs)
        finally:
            stop(*procs)
            broker.stop()
    return {"services": [s.name for s in specs], "domains": results}


async def _ask_all(
    kind: str,
    broker: LocalBroker,
    specs: list[ServiceSpec],
    items: dict[str, list[_Item]],
    args: argparse.Namespace,
    sandbox: Sandbox,
    procs: list,  # type: ignore[type-arg]
) -> dict[str, object]:
    client_id = f"quality-{uuid.uuid4().hex[:6]}"
    bus = Bus(settings=broker.login(client_id), client_id=client_id, service="bench")
    view = CmsView(bus)
    client = QueryClient(bus, view)
    agents = [_arg(s, "--agent-id") for s in specs]
    results: dict[str, object] = {}
    async with running(bus):
        if not await view.wait_online(agents, timeout=600):
            dead = [s.name for s, p in zip(specs, procs, strict=True) if p.poll() is not None]
            raise SystemExit(f"bench quality: the {kind} stack did not come online ({dead} exited)")
        for domain, domain_items in items.items():
            graded = []
            for n, item in enumerate(domain_items):
                print(f"quality: {kind} {item.id}", file=sys.stderr, flush=True)
                graded.append(
                    await _one(domain, item, n, kind, client, broker, view, args, sandbox)
                )
            results[domain] = _summary(graded, args.details)
    return results


async def _one(
    domain: str,
    item: _Item,
    n: int,
    kind: str,
    client: QueryClient,
    broker: LocalBroker,
    view: CmsView,
    args: argparse.Namespace,
    sandbox: Sandbox,
) -> dict[str, object]:
    text = item.prompt if isinstance(item, CodeItem) else item.question  # type: ignore[attr-defined]
    readings = (
        injected(broker, view, item, n)
        if isinstance(item, SensorItem) and kind == "cooperating"
        else contextlib.nullcontext()
    )
    async with readings:
        answer, ms, error = await ask(client, text, MAX_TOKENS[domain], args.timeout)
    reply = answer.text if answer is not None and answer.outcome != "failed" else ""
    correct = bool(reply) and await grade(item, reply, sandbox)
    steps = answer.steps if answer is not None else []
    general = next((s for s in steps if s.name == "answer"), None)
    replaced = general.output if general is not None else None  # an expert answered a gap
    expert = next((s.output for s in steps if s.name.startswith("knowledge:") and replaced), None)
    verdict = next((s.detail for s in steps if s.name.startswith("check:")), None)
    return {
        "id": item.id,
        "correct": correct,
        "confidence": general.confidence if general is not None else None,
        "general_correct": await grade(item, replaced, sandbox) if replaced else None,
        "expert_correct": await grade(item, expert, sandbox) if expert else None,
        "general_answer": replaced[:ANSWER_CHARS] if replaced else None,
        "expert_answer": expert[:ANSWER_CHARS] if expert else None,
        "check": verdict,
        "ms": round(ms, 1),
        "answered": answer is not None and answer.outcome in ("edge", "cloud", "rejected_to_cloud"),
        "path": path(answer) if answer is not None else f"no answer: {error}",
        "answer": reply[:ANSWER_CHARS],
    }


async def ask(
    client: QueryClient, text: str, max_tokens: int, timeout: float
) -> tuple[Answer | None, float, str | None]:
    """The Answer (None when none came), the milliseconds until it came, and why not."""
    query = Query(
        request_id=f"quality-{uuid.uuid4().hex[:12]}",
        text=text,
        max_tokens=max_tokens,
        deadline=time.time() + timeout,
    )
    started = time.perf_counter()
    try:
        answer = await client.ask(query)
    except EdgecollabError as exc:
        return None, (time.perf_counter() - started) * 1000, str(exc)
    return answer, (time.perf_counter() - started) * 1000, None


def path(answer: Answer) -> str:
    """The steps an answer took: names, `!` for a failed one, the agent of each generation."""
    parts = []
    for step in answer.steps:
        mark = "!" if step.outcome == "failed" else ""
        if step.name.startswith("data:"):  # an injected sensor, a new one for every item
            parts.append(f"data{mark}")
            continue
        agent = f"({step.agent})" if step.agent and step.name != "classify" else ""
        parts.append(f"{step.name}{mark}{agent}")
    return ">".join(parts)


def _summary(graded: list[dict[str, object]], details: bool) -> dict[str, object]:
    latencies = [float(g["ms"]) for g in graded if g["answered"]]  # type: ignore[arg-type]
    correct = sum(1 for g in graded if g["correct"])
    odd = graded[1::2]
    summary: dict[str, object] = {
        "n": len(graded),
        "correct": correct,
        "accuracy": round(correct / len(graded), 3) if graded else None,
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "failed": sum(1 for g in graded if not g["answered"]),
        # odd positions: the gap threshold was chosen on the even ones (bench gap)
        "held_out": {"n": len(odd), "correct": sum(1 for g in odd if g["correct"])},
        "paths": dict(Counter(str(g["path"]) for g in graded).most_common()),
    }
    both = [g for g in graded if g.get("general_correct") is not None
            and g.get("expert_correct") is not None]  # fmt: skip
    if both:  # a second opinion: how the chosen answers compare with either model's
        summary["second_opinions"] = {
            "n": len(both),
            "general_right": sum(1 for g in both if g["general_correct"]),
            "expert_right": sum(1 for g in both if g["expert_correct"]),
            "either_right": sum(1 for g in both if g["general_correct"] or g["expert_correct"]),
            "chosen_right": sum(1 for g in both if g["correct"]),
        }
    scored = [g for g in graded if g["confidence"] is not None]
    if scored:  # does the general model's signal tell its right answers from its wrong ones?
        own = [g["correct"] if g["general_correct"] is None else g["general_correct"]
               for g in scored]  # fmt: skip
        summary["auroc_confidence"] = auroc(
            [float(g["confidence"]) for g in scored],  # type: ignore[arg-type]
            [bool(r) for r in own],
        )
    if details:
        summary["items"] = graded
    return summary


# -- grading ------------------------------------------------------------------------------


async def grade(item: _Item, answer: str, sandbox: Sandbox) -> bool:
    if isinstance(item, CodeItem):
        return await check_code(item, answer, sandbox)
    if isinstance(item, MathItem):
        return check_number(item.answer, answer)
    if isinstance(item, FactItem):
        return mentions_any(answer, item.answers)
    assert isinstance(item, SensorItem)
    return check_sensor_answer(item, answer)


def function_source(answer: str, name: str) -> str | None:
    """The code defining `name` in an answer: the first Python block that defines it, else
    the answer's lines from `def name(` on, while they are indented or blank."""
    defines = re.compile(rf"^\s*def {re.escape(name)}\s*\(", re.M)
    for tag, body in code_blocks(answer):
        if tag in PYTHON_TAGS and defines.search(body):
            return textwrap.dedent(body)
    lines = answer.splitlines()
    for i, line in enumerate(lines):
        if defines.match(line):
            indent = len(line) - len(line.lstrip())
            body = [line]
            for more in lines[i + 1 :]:
                if more.strip() and len(more) - len(more.lstrip()) <= indent:
                    break
                body.append(more)
            return textwrap.dedent("\n".join(body))
    return None


async def check_code(item: CodeItem, answer: str, sandbox: Sandbox) -> bool:
    """The answer's function passes the item's asserts, run in the sandbox."""
    source = function_source(answer, item.function)
    if source is None:
        return False
    program = "\n".join([source, "", *item.asserts, f"print({PASSED!r})", ""])
    outcome = await sandbox.run(program, Limits(wall_s=20.0, cpu_s=10))
    return outcome.ok and outcome.stdout.strip().endswith(PASSED)


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def check_number(expected: float, answer: str) -> bool:
    """The last number in the answer is the expected one."""
    value = last_number(answer)
    return value is not None and abs(value - expected) <= 1e-6 * max(1.0, abs(expected))


def normalize(text: str) -> str:
    """Lower case, no accents, words separated by single spaces (punctuation dropped;
    thousands separators dropped: "7,981,960" is one number, not a 7; a whole number's ".0"
    dropped: "85.0" is 85, and "36.6" stays two words, as its expected "36.6" does; a degree
    sign is a space)."""
    spaced = text.replace("°", " ")  # "0°C" is 0 degrees C, not a word "0c"
    plain = unicodedata.normalize("NFKD", spaced).encode("ascii", "ignore").decode().lower()
    plain = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", plain)
    plain = re.sub(r"(?<=\d)\.0+(?!\d)", "", plain)
    return " ".join(re.sub(r"[^a-z0-9]+", " ", plain).split())


def mentions_any(answer: str, accepted: list[str]) -> bool:
    """One of `accepted` appears in the answer as whole words (after normalising both)."""
    text = f" {normalize(answer)} "
    return any(f" {normalize(a)} " in text for a in accepted if normalize(a))


def check_sensor_answer(item: SensorItem, answer: str) -> bool:
    """Every expected group (e.g. the injected abnormal value) is mentioned.

    A minimal check: the full grounding check (each alerted stream, value, unit, threshold,
    no invented numbers) belongs to the sensor-scenario runner, tools/bench/grounding.py;
    when it lands, this function is where its verdict plugs in.
    """
    return all(mentions_any(answer, group) for group in item.expect)


# -- injected readings ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def injected(
    broker: LocalBroker, view: CmsView, item: SensorItem, n: int
) -> AsyncIterator[None]:
    """A sensor agent of this bench publishing `item.readings` while the block runs, online
    (in `view`, hence in every orchestrator's view) before the block starts."""
    streams = {name: lookup(item.domain, name) for name in item.readings}
    unknown = [name for name, stream in streams.items() if stream is None]
    if unknown:
        raise SystemExit(f"bench quality: {item.id}: no {item.domain} stream {unknown}")
    agent = f"quality-sensor-{n}-{uuid.uuid4().hex[:6]}"
    topics = {
        name: READING.format(domain=item.domain, stream=name, agent=agent) for name in streams
    }
    card = AgentCard(agent=agent, kind="sensor", epoch=1, domains=[item.domain],
                     streams=list(topics.values()), started_at=now())  # fmt: skip
    mqtt = broker.login(agent, "sensor")
    presence = Presence(card, heartbeat_s=mqtt.keepalive / 2)
    bus = Bus(settings=mqtt, client_id=agent, service="bench", will=presence.will())
    presence.attach(bus)

    async def publish() -> None:
        while True:
            for name, stream in streams.items():
                assert stream is not None
                value, unit = item.readings[name], stream.unit
                reading = Reading(
                    agent=agent, domain=item.domain, stream=name, value=value, unit=unit,
                    ts=time.time(),
                )  # fmt: skip
                await bus.publish(topics[name], reading)
            await asyncio.sleep(READING_EVERY_S)

    async with running(bus):
        tasks = [asyncio.create_task(publish()), asyncio.create_task(presence.run(bus))]
        try:
            if not await view.wait_online([agent], timeout=30):
                raise SystemExit(f"bench quality: {item.id}: the injected sensor never came online")
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(EdgecollabError, TimeoutError):
                async with asyncio.timeout(5):
                    await presence.retire(bus)
