"""`edgecollab ask "question"`: send a Query, stream the answer, print its provenance."""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
import time
import uuid
from pathlib import Path

from pydantic import ValidationError

from schemas import Answer, Query, SamplingOptions, TokenChunk
from services.core.bus import Request
from services.core.client import QueryClient
from services.core.errors import DeadlineExceeded, NotAuthorized, RemoteError
from services.core.topics import STREAM
from services.core.transcript import Transcript
from tools.cli.agents import format_table
from tools.common import add_broker_option, connected_bus, print_json

MAX_PROMPT: int = Query.model_json_schema()["properties"]["text"]["maxLength"]
MAX_TOKENS: int = Query.model_json_schema()["properties"]["max_tokens"]["maximum"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("ask", help="ask the edge cluster a question")
    parser.add_argument("question", nargs="?", help="the question; '-' reads it from stdin")
    parser.add_argument("--file", metavar="FILE", help="read the question from FILE")
    parser.add_argument("--max-tokens", type=int, default=128, help=f"1-{MAX_TOKENS}")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    parser.add_argument("--json", action="store_true", help="print the Answer as JSON")
    add_broker_option(parser)
    parser.set_defaults(func=lambda args: asyncio.run(ask(args)))


def question_of(args: argparse.Namespace) -> str:
    """The question from the argument, stdin (`-`) or --file; a clear error when unusable."""
    file = getattr(args, "file", None)
    if file is not None and args.question is not None:
        raise SystemExit("edgecollab: give the question or --file, not both")
    if file is not None:
        try:
            data = Path(file).read_bytes()
        except OSError as exc:
            raise SystemExit(f"edgecollab: cannot read {file}: {exc.strerror}") from None
        text = _decode(data, file)
    elif args.question == "-":
        text = _decode(sys.stdin.buffer.read(), "stdin")
    elif args.question is None:
        raise SystemExit("edgecollab: no question (give one, '-' for stdin, or --file FILE)")
    else:
        text = args.question
    if not text.strip():
        raise SystemExit("edgecollab: the question is empty")
    if len(text) > MAX_PROMPT:
        raise SystemExit(
            f"edgecollab: the question has {len(text):,} characters; at most {MAX_PROMPT:,}"
        )
    return text


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise SystemExit(f"edgecollab: {where} is not UTF-8 text") from None


async def ask(args: argparse.Namespace) -> int:
    text = question_of(args)
    if not 1 <= args.max_tokens <= MAX_TOKENS:
        raise SystemExit(f"edgecollab: --max-tokens must be 1-{MAX_TOKENS}")
    if not args.timeout > 0:
        raise SystemExit("edgecollab: --timeout must be positive")
    stream = not (args.no_stream or args.json)
    try:
        query = Query(
            request_id=f"ask-{uuid.uuid4().hex[:12]}",
            text=text,
            max_tokens=args.max_tokens,
            deadline=time.time() + args.timeout,
            stream=stream,
            sampling=SamplingOptions(temperature=args.temperature),
        )
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise SystemExit(f"edgecollab: {where}: {exc.errors()[0]['msg']}") from None
    transcript = Transcript()  # a grounded answer is not streamed: its text comes at the end

    def print_chunk(request: Request[TokenChunk]) -> None:
        if (text := transcript.add(request.body)) is not None:
            sys.stdout.write(text)
            sys.stdout.flush()

    async with connected_bus(args, mirror_cms=True) as (bus, view):
        assert view is not None
        if stream:
            await bus.follow(STREAM, print_chunk, client=bus.client_id, request=query.request_id)
        try:
            answer = await QueryClient(bus, view).ask(query, transcript)
        except (DeadlineExceeded, NotAuthorized, RemoteError) as exc:
            print(f"\nedgecollab: {exc}", file=sys.stderr)
            return 1
    assert isinstance(answer, Answer)
    if args.json:
        print_json(answer.model_dump(mode="json"))
    else:
        print(transcript.rest(answer.text))
        print(provenance(answer))
    return 0 if answer.outcome in ("edge", "cloud", "rejected_to_cloud") else 1


def provenance(answer: Answer) -> str:
    """One line per step: where it ran, what it cost."""
    head = (
        f"-- {answer.outcome}{' (partial)' if answer.partial else ''} in {answer.ms:.0f} ms, "
        f"cloud cost ${answer.cost_usd:.6f}"
    )
    if answer.verified is not None:
        basis = (
            f"{len(answer.facts)} measured values from the readings"
            if answer.facts or not answer.passages
            else f"{len(answer.passages)} passages retrieved"
        )
        head += f", {basis}, " + (
            "the model's text cites no value they do not support"
            if answer.verified
            else f"removed the model's unmatched {', '.join(answer.unverified)}"
        )
    rows = [
        {
            "step": step.name,
            "where": step.where,
            "agent": f"{step.agent} at site {step.site}" if step.site else step.agent or "-",
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
    programs = [
        f"   program of step {step.name} ({step.agent or '-'}):\n"
        + textwrap.indent(step.program.rstrip("\n"), "     | ")
        for step in answer.steps
        if step.program
    ]
    not_taken = [  # a second opinion or a gap: the answers given that are not the answer
        f"   answer of step {step.name} ({step.agent or '-'}"
        + (f", confidence {step.confidence:.2f}" if step.confidence is not None else "")
        + "), not taken:\n"
        + textwrap.indent(step.output.rstrip("\n"), "     | ")
        for step in answer.steps
        if step.output and step.output != answer.text
    ]
    return "\n".join([head, *("   " + line for line in table.splitlines()), *programs, *not_taken])
