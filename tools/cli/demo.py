"""`edgecollab demo health|city`: the paper's two scenarios (Fig. 5) against a running stack."""

from __future__ import annotations

import argparse
import asyncio

from tools.cli.ask import ask
from tools.common import add_broker_option

SCENARIOS = {
    # Fig. 5a, sequential: vitals -> analysis -> medical expert -> advice + clinician report
    "health": "I have felt hot and dizzy since this morning and my heart is racing. "
    "What is going on, and what should I do?",
    # Fig. 5b, parallel: camera, air quality, noise, traffic and an expert at once -> aggregate
    "city": "Evaluate environmental risks for setting up an outdoor event",
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the paper's health or city scenario")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--question", help="ask this instead of the scenario's question")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds (default 180)")
    parser.add_argument("--json", action="store_true", help="print the Answer as JSON")
    add_broker_option(parser)
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    question = args.question or SCENARIOS[args.scenario]
    if not args.json:
        print(f"[{args.scenario}] {question}\n")
    ask_args = argparse.Namespace(
        question=question,
        file=None,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
        temperature=None,
        no_stream=False,
        json=args.json,
        broker=args.broker,
    )
    return asyncio.run(ask(ask_args))
