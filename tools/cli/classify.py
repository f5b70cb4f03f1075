"""`edgecollab classify`: run the Classifier Engine on one text or on JSON Lines, offline.

Without `--agents` no agent cards are known, so every domain but `general` is a knowledge gap
and `matches` is empty; `--agents FILE` (a JSON list or JSON Lines of cards with `agent`,
`kind`, `domains`, optional `tokens_per_s`) stands in for the CMS. Each non-blank input line
gives one output line (`line` number and any `id` copied); a refused line (not JSON, not an
object, no or empty text, over 8000 characters) gives `{"line", "error", "message"}` and the
exit status is then 1. Without `--model`, the packaged all-MiniLM-L6-v2 is exported on first use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from services.classifier.inputs import ClassifierInputError, check_text
from services.classifier.matching import AgentInfo
from services.core.logging import configure_logging
from tools.export.packages import MINILM_DIR, ensure_minilm

if TYPE_CHECKING:
    from services.classifier.engine import ClassifierEngine

BATCH = 32


def read_agents(path: Path) -> list[AgentInfo]:
    """Agent cards from a JSON list or JSON Lines file; a bad file stops the command."""
    try:
        raw = path.read_bytes().strip()
        items = (
            orjson.loads(raw)
            if raw.startswith(b"[")
            else [orjson.loads(x) for x in raw.splitlines() if x.strip()]
        )
        return [_card(c) for c in items]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SystemExit(f"{path}: not a list of agent cards ({exc!r})") from exc


def _card(c: dict[str, Any]) -> AgentInfo:
    domains = c.get("domains", [])
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise ValueError(f"agent {c.get('agent')!r}: domains must be a list of strings")
    return AgentInfo(
        agent=str(c["agent"]),
        kind=str(c.get("kind", "worker")),
        domains=tuple(domains),
        tokens_per_s=c.get("tokens_per_s"),
        concurrency=c.get("concurrency"),
    )


def parse_line(number: int, line: bytes) -> tuple[dict[str, Any], str | None]:
    """(identity fields for the output, the text) or (an error object, None)."""
    head: dict[str, Any] = {"line": number}
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return {**head, "error": "bad_json", "message": str(exc)}, None
    if not isinstance(item, dict):
        return {**head, "error": "bad_request", "message": "a line must be a JSON object"}, None
    if "id" in item:
        head["id"] = item["id"]
    try:
        return head, check_text(item.get("text"))
    except ClassifierInputError as exc:
        return {**head, "error": "bad_request", "message": str(exc)}, None


def classify_lines(
    engine: ClassifierEngine, lines: Iterator[bytes], agents: list[AgentInfo]
) -> Iterator[dict[str, Any]]:
    """One output object per non-blank input line, in order; bad lines give error objects."""
    pending: list[tuple[dict[str, Any], str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        head, text = parse_line(number, line)
        if text is None:
            yield from _flush(engine, pending, agents)
            pending = []
            yield head
            continue
        pending.append((head, text))
        if len(pending) == BATCH:
            yield from _flush(engine, pending, agents)
            pending = []
    yield from _flush(engine, pending, agents)


def _flush(
    engine: ClassifierEngine, pending: list[tuple[dict[str, Any], str]], agents: list[AgentInfo]
) -> Iterator[dict[str, Any]]:
    results = engine.classify_batch([text for _, text in pending], agents)
    for (head, _), result in zip(pending, results, strict=True):
        yield {**head, **result.to_dict()}


def run(args: argparse.Namespace) -> int:
    """Classify `text` or the lines of `--in`, writing JSON Lines to `--out` or stdout."""
    from services.classifier.engine import ClassifierEngine, HeadsError  # onnxruntime: when used

    configure_logging("classify")
    if (args.text is None) == (args.input is None):
        print("give either TEXT or --in FILE", file=sys.stderr)
        return 2
    agents = read_agents(args.agents) if args.agents else []
    try:
        engine = ClassifierEngine.load(ensure_minilm(args.model), threads=args.threads)
    except HeadsError as exc:
        raise SystemExit(f"classify: {exc}") from None
    if args.text is not None:
        lines: Iterator[bytes] = iter([orjson.dumps({"text": args.text})])
        return _write(classify_lines(engine, lines, agents), args.out)
    with _open_in(args.input) as fh:
        return _write(classify_lines(engine, iter(fh), agents), args.out)


def _open_in(path: str) -> Any:
    return nullcontext(sys.stdin.buffer) if path == "-" else Path(path).open("rb")


def _write(rows: Iterator[dict[str, Any]], out: Path | None) -> int:
    errors = 0
    with out.open("wb") if out else nullcontext(sys.stdout.buffer) as fh:
        for row in rows:
            errors += "error" in row
            _dump(fh, row)
    return 1 if errors else 0


def _dump(fh: IO[bytes], row: dict[str, Any]) -> None:
    fh.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    fh.flush()


def register(sub: argparse._SubParsersAction) -> None:
    """Add `classify` to the edgecollab command."""
    parser = sub.add_parser(
        "classify",
        help="classify queries (domain, complexity, gap, matches) offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("text", nargs="?", help="one query (or use --in)")
    parser.add_argument(
        "--in", dest="input", metavar="FILE", help="JSON Lines with `text` ('-' = stdin)"
    )
    parser.add_argument("--out", type=Path, default=None, help="output JSON Lines (default stdout)")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"exported MiniLM folder (default {MINILM_DIR})",
    )
    parser.add_argument(
        "--agents", type=Path, default=None, help="agent cards (JSON list or JSON Lines)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads (default: physical cores)"
    )
    parser.set_defaults(func=run)
