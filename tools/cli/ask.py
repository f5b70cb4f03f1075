"""`edgecollab ask "question"`: send a Query, stream the answer, print its provenance."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from schemas import Answer, Query, SamplingOptions, TokenChunk
from services.core.bus import Request
from services.core.errors import DeadlineExceeded, RemoteError
from services.core.topics import QUERIES, STREAM
from tools.cli.agents import format_table
from tools.common import add_broker_option, connected_bus, print_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("ask", help="ask the edge cluster a question")
    parser.add_argument("question")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    parser.add_argument("--json", action="store_true", help="print the Answer as JSON")
    add_broker_option(parser)
    parser.set_defaults(func=lambda args: asyncio.run(ask(args)))


async def ask(args: argparse.Namespace) -> int:
    stream = not (args.no_stream or args.json)
    query = Query(
        request_id=f"ask-{uuid.uuid4().hex[:12]}",
        text=args.question,
        max_tokens=args.max_tokens,
        deadline=time.time() + args.timeout,
        stream=stream,
        sampling=SamplingOptions(temperature=args.temperature),
    )
    async with connected_bus(args) as (bus, _):
        if stream:
            await bus.follow(STREAM, _print_chunk, client=bus.client_id, request=query.request_id)
        try:
            answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
        except (DeadlineExceeded, RemoteError) as exc:
            print(f"\nedgecollab: {exc}", file=sys.stderr)
            return 1
    assert isinstance(answer, Answer)
    if args.json:
        print_json(answer.model_dump(mode="json"))
    else:
        print(("\n" if stream else "") + ("" if stream else answer.text))
        print(provenance(answer))
    return 0 if answer.outcome in ("edge", "cloud", "rejected_to_cloud") else 1


def _print_chunk(request: Request[TokenChunk]) -> None:
    sys.stdout.write(request.body.text)
    sys.stdout.flush()


def provenance(answer: Answer) -> str:
    """One line per step: where it ran, what it cost."""
    head = (
        f"-- {answer.outcome}{' (partial)' if answer.partial else ''} in {answer.ms:.0f} ms, "
        f"cloud cost ${answer.cost_usd:.6f}"
    )
    rows = [
        {
            "step": step.name,
            "where": step.where,
            "agent": step.agent or "-",
            "outcome": step.outcome,
            "tokens": f"{step.prompt_tokens}+{step.output_tokens}",
            "ms": f"{step.ms:.1f}",
            "usd": f"{step.cost_usd:.6f}" if step.cost_usd else "-",
            "topic": step.topic,
            "detail": step.detail or "",
        }
        for step in answer.steps
    ]
    table = format_table(rows) if rows else ""
    return "\n".join([head, *("   " + line for line in table.splitlines())])
