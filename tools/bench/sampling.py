"""`edgecollab bench sampling`: decoding settings against answer quality, per model and domain.

One model folder is loaded in this process (the worker's own Engine and Generator, so every
token comes from the code the worker runs) and the labelled set of `bench quality`
(`tools/bench/data/quality/`) is answered once per setting: repetition penalty, temperature
and system prompt, each varied on its own around a baseline (greedy, no penalty, the model's
own system prompt). The prompt is the one the stack renders for the role the model plays:

- `general`: a task of the final generation, `ANSWER` of the planner ("(no context)\\n\\nQuestion:
  ...") under the model's default system prompt;
- `expert`: a knowledge question (`knowledge/<domain>/ask`): the question alone under the
  worker's `EXPERT_PROMPT`.

Grading is `bench quality`'s (code run with its asserts in the sandbox, the last number for
math, an accepted alias for facts). `advice` is the final generation of a grounded answer (the
planner's health or city answer prompt over the sensor scenarios' readings), right when no
sentence of it comes twice: it measures the loops a small model falls into. Every item records
the worker's knowledge-gap signal (`confidence`, `entropy` of its first tokens), which
`edgecollab bench gap` reads. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tools.common import print_json

DOMAINS = ("facts", "code", "math", "advice")
EXPERT_DOMAIN = {"facts": "facts", "code": "code", "math": "math"}  # as the stack asks them
ITEMS_OF = {"advice": "sensors"}  # the labelled set a domain's prompts come from
MAX_TOKENS_OF = {"advice": 160}


@dataclass(frozen=True)
class Setting:
    name: str
    repetition_penalty: float = 1.0
    temperature: float = 0.0
    # default: the one the stack sends in this role (general: the model's own; expert: the
    # worker's EXPERT_PROMPT); expert: EXPERT_PROMPT; none: an empty system message
    system: str = "default"


# One factor at a time around the baseline: 7 settings instead of a 3 x 3 x 3 grid.
SETTINGS = (
    Setting("baseline"),
    Setting("penalty-1.1", repetition_penalty=1.1),
    Setting("penalty-1.15", repetition_penalty=1.15),
    Setting("temperature-0.3", temperature=0.3),
    Setting("temperature-0.7", temperature=0.7),
    Setting("system-expert", system="expert"),
    Setting("system-none", system="none"),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sampling", help="repetition penalty, temperature and system prompt against quality"
    )
    parser.add_argument("--model", required=True, help="model folder (a name under models/)")
    parser.add_argument("--role", choices=("general", "expert"), default="general")
    parser.add_argument("--domain", action="append", choices=DOMAINS, help="repeatable; all")
    parser.add_argument("--limit", type=int, metavar="N", help="the first N items per domain")
    parser.add_argument(
        "--setting", action="append", choices=[s.name for s in SETTINGS], help="repeatable; all"
    )
    parser.add_argument("--threads", type=int, help="default: physical cores")
    parser.add_argument("--details", action="store_true", help="every item's answer")
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


async def bench(args: argparse.Namespace) -> int:
    from services.core.logging import configure_logging
    from services.core.settings import RuntimeSettings
    from services.sandbox.runner import Sandbox
    from services.worker.engine import Engine
    from services.worker.generator import Generator
    from tools.bench.quality import MAX_TOKENS, load

    configure_logging("bench", level="warning")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("bench sampling: --limit must be at least 1")
    folder = Path(args.model)
    if not (folder / "model.json").is_file():
        folder = RuntimeSettings().models_dir / args.model
    if not (folder / "model.json").is_file():
        raise SystemExit(f"bench sampling: no model folder {args.model!r}")
    engine = Engine.load(folder, threads=args.threads)
    generator = Generator(engine, max_batch=1)
    sandbox = await Sandbox.detect()
    domains = args.domain or list(DOMAINS)
    items = {d: load(ITEMS_OF.get(d, d), args.limit) for d in domains}
    chosen = [s for s in SETTINGS if not args.setting or s.name in args.setting]
    report: dict[str, object] = {
        "model": engine.card["name"],
        "role": args.role,
        "limit": args.limit,
        "max_tokens": {d: MAX_TOKENS_OF.get(d) or MAX_TOKENS[d] for d in domains},
        "settings": {},
    }
    try:
        for setting in chosen:
            results = {}
            for domain, domain_items in items.items():
                graded = [
                    await _one(generator, engine, setting, args.role, domain, item, n, sandbox)
                    for n, item in enumerate(domain_items)
                ]
                results[domain] = _summary(graded, args.details)
                print(f"sampling: {setting.name} {domain}: {results[domain]['correct']}/"
                      f"{len(graded)}", file=sys.stderr, flush=True)  # fmt: skip
            report["settings"][setting.name] = {  # type: ignore[index]
                "repetition_penalty": setting.repetition_penalty,
                "temperature": setting.temperature,
                "system": setting.system,
                "domains": results,
            }
    finally:
        await generator.close()
    print_json(report)
    return 0


def messages(setting: Setting, role: str, domain: str, question: str) -> list[dict]:
    """The chat the stack sends the model for `question` in `role`, with `setting`'s system."""
    from services.orchestrator.planner import ANSWER, PlanStep, render
    from services.worker.service import EXPERT_PROMPT

    if domain == "advice":
        user, system = question, None  # already the rendered answer prompt (`advice_prompt`)
    elif role == "general":
        user = render(PlanStep("answer", "generate", prompt=ANSWER), question, {})
        system = None
    else:
        user, system = question, EXPERT_PROMPT.format(domain=EXPERT_DOMAIN[domain])
    if setting.system == "expert":
        system = EXPERT_PROMPT.format(domain=EXPERT_DOMAIN[domain])
    elif setting.system == "none":
        system = ""
    chat = [{"role": "system", "content": system}] if system is not None else []
    return [*chat, {"role": "user", "content": user}]


async def _one(generator, engine, setting, role, domain, item, n, sandbox) -> dict[str, object]:  # type: ignore[no-untyped-def]
    from services.worker.sampling import SamplingParams
    from tools.bench.quality import MAX_TOKENS, CodeItem, grade

    question = item.prompt if isinstance(item, CodeItem) else item.question
    if domain == "advice":
        question = advice_prompt(item)
    params = SamplingParams(
        max_tokens=MAX_TOKENS_OF.get(domain) or MAX_TOKENS[domain],
        temperature=setting.temperature,
        repetition_penalty=setting.repetition_penalty,
        seed=n,  # the same draw for an item under every sampled setting
    )
    started = time.perf_counter()
    text, stats = await generator.submit(messages(setting, role, domain, question), params).result()
    ms = (time.perf_counter() - started) * 1000
    return {
        "id": item.id,
        "correct": bool(text.strip())
        and (repeated(text) == 0 if domain == "advice" else await grade(item, text, sandbox)),
        "confidence": stats.confidence,
        "entropy": stats.entropy,
        "output_tokens": stats.output_tokens,
        "ms": round(ms, 1),
        "answer": text[:600],
    }


def advice_prompt(item) -> str:  # type: ignore[no-untyped-def]
    """The planner's final prompt of a grounded answer to a sensor scenario."""
    from services.orchestrator.planner import CITY_ANSWER, HEALTH_ANSWER, PlanStep, render

    template = HEALTH_ANSWER if item.domain == "health" else CITY_ANSWER
    readings = ", ".join(f"{stream} {value}" for stream, value in item.readings.items())
    step = PlanStep("answer", "generate", after=("data",), prompt=template)
    return render(step, item.question, {"data": readings})


def repeated(text: str) -> int:
    """Sentences (12 characters or more) that come again later in `text`."""
    import re

    sentences = [s.strip() for s in re.split(r"[.!?\n]+", text) if len(s.strip()) >= 12]
    return len(sentences) - len(set(sentences))


def _summary(graded: list[dict[str, object]], details: bool) -> dict[str, object]:
    correct = sum(1 for g in graded if g["correct"])
    summary: dict[str, object] = {
        "n": len(graded),
        "correct": correct,
        "accuracy": round(correct / len(graded), 3),
        "p50_ms": round(statistics.median(float(g["ms"]) for g in graded), 1),  # type: ignore[arg-type]
        "mean_output_tokens": round(
            statistics.mean(int(g["output_tokens"]) for g in graded),  # type: ignore[call-overload]
            1,
        ),
    }
    summary["items"] = (
        graded
        if details
        else [{k: g[k] for k in ("id", "correct", "confidence", "entropy")} for g in graded]
    )
    return summary
