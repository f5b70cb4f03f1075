"""`edgecollab bench kb`: does the knowledge base find the right passage? JSON.

The shipped documents (services/kb/data) are indexed as the knowledge base indexes them (the same
chunking, embedder and search: services/kb), then each question of
tools/bench/data/kb_questions.jsonl (written apart from the documents: other words, the
user's) is searched. A question names its domain and the title of the section that answers it;
it counts as found at rank r when a passage of that section is the r-th nearest. Printed:
recall@1 and @3 and the mean reciprocal rank, searched in the question's domain and across all
domains; each miss; and for the off-topic questions (`expect` null) the nearest passage's
score, which is what the orchestrator's MIN_SCORE must stay above.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from services.core.embedder import Embedder
from services.core.logging import configure_logging
from services.kb.index import Index
from services.kb.service import shipped
from services.orchestrator.cooperation import MIN_SCORE
from tools import ROOT
from tools.common import print_json
from tools.export.packages import ensure_minilm

QUESTIONS = ROOT / "tools" / "bench" / "data" / "kb_questions.jsonl"
DOMAINS = ("health", "environment")
DEPTH = 3


@dataclass(frozen=True)
class Question:
    domain: str
    question: str
    expect: str | None  # the answering section's title; None: off-topic


def load(path: Path = QUESTIONS) -> list[Question]:
    return [Question(**orjson.loads(line)) for line in path.read_text().splitlines() if line]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "kb", help="knowledge-base retrieval: recall@1/@3 on kept-apart questions"
    )
    parser.add_argument("--model", type=Path, default=None, help="exported MiniLM folder")
    parser.add_argument("--questions", type=Path, default=QUESTIONS, help="a JSON-lines file")
    parser.set_defaults(func=bench)


def bench(args: argparse.Namespace) -> int:
    configure_logging("bench", level="warning")
    embedder = Embedder.load(ensure_minilm(args.model))
    started = time.perf_counter()
    index = Index(embedder.card.name, embedder.dims)
    for document in shipped(DOMAINS):
        index.put(document, embedder.embed([c.embedded for c in document.chunks]))
    built_s = time.perf_counter() - started
    questions = load(args.questions)
    asked = [q for q in questions if q.expect is not None]
    ranks: dict[str, list[int | None]] = {"in_domain": [], "any_domain": []}
    misses: list[dict[str, Any]] = []
    off_topic: list[dict[str, Any]] = []
    search_ms: list[float] = []
    for q in questions:
        started = time.perf_counter()
        vector = embedder.embed([q.question])[0]
        near = index.search(q.domain, vector, k=DEPTH)
        anywhere = sorted(
            (p for d in DOMAINS for p in index.search(d, vector, k=DEPTH)), key=lambda p: -p.score
        )[:DEPTH]
        search_ms.append((time.perf_counter() - started) * 1000)
        if q.expect is None:
            off_topic.append({"question": q.question, "nearest": near[0].title,
                              "score": near[0].score})  # fmt: skip
            continue
        for where, found in (("in_domain", near), ("any_domain", anywhere)):
            titles = [p.title for p in found]
            rank = titles.index(q.expect) + 1 if q.expect in titles else None
            ranks[where].append(rank)
            if where == "in_domain" and rank != 1:
                misses.append({"question": q.question, "expect": q.expect, "rank": rank,
                               "got": [f"{p.title} ({p.score:.2f})" for p in found]})  # fmt: skip
    print_json(
        {
            "model": embedder.card.name,
            "passages": len(index),
            "questions": len(asked),
            "off_topic_questions": len(off_topic),
            **{where: _scores(r) for where, r in ranks.items()},
            "min_score": MIN_SCORE,
            "off_topic_nearest_max": max((o["score"] for o in off_topic), default=None),
            "answering_passage_score_min": _lowest_right(index, embedder, asked),
            "index_build_s": round(built_s, 3),
            "search_ms_mean": round(sum(search_ms) / len(search_ms), 2),
            "misses": misses,
            "off_topic": off_topic,
        }
    )
    return 0


def _scores(ranks: list[int | None]) -> dict[str, float]:
    n = len(ranks)
    return {
        "recall_at_1": round(sum(r == 1 for r in ranks) / n, 3),
        f"recall_at_{DEPTH}": round(sum(r is not None for r in ranks) / n, 3),
        "mrr": round(sum(1 / r for r in ranks if r) / n, 3),
    }


def _lowest_right(index: Index, embedder: Embedder, asked: list[Question]) -> float:
    """The lowest score the answering passage gets for its question (at any rank)."""
    lowest = 1.0
    for q in asked:
        found = index.search(q.domain, embedder.embed([q.question])[0], k=len(index))
        lowest = min(lowest, max(p.score for p in found if p.title == q.expect))
    return lowest
