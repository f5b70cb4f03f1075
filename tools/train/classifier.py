"""Train the Classifier Engine's heads on the shipped train split and evaluate on the test split.

`python -m tools.train.classifier [--model DIR] [--out FILE]` writes the heads (default
services/classifier/data/head.npz) and prints one JSON report: 5-fold cross-validation on the
train split, then domain, sub-label and difficulty accuracy and the domain confusion matrix on
the test split, which training never sees.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from services.classifier.embedder import Embedder
from services.classifier.engine import ClassifierEngine
from services.classifier.head import ClassifierHeads
from services.classifier.training import (
    HEADS_PATH,
    PROBE_TEXTS,
    TEST_PATH,
    TRAIN_PATH,
    embed_batched,
    fit_heads,
    read_examples,
)
from services.core.logging import configure_logging
from tools.export.packages import ensure_minilm
from tools.train.evaluation import cross_validate, evaluate


def train(embedder: Embedder, train_path: Path) -> tuple[ClassifierHeads, dict[str, Any]]:
    """Fit the heads on every train example; also cross-validate them."""
    examples = read_examples(train_path)
    started = time.perf_counter()
    vectors = embed_batched(embedder.embed, [e.text for e in examples])
    embedded = time.perf_counter()
    heads = fit_heads(
        vectors, examples, model=embedder.card.name, probes=embedder.embed(list(PROBE_TEXTS))
    )
    info = {
        "examples": len(examples),
        "embed_s": round(embedded - started, 2),
        "fit_s": round(time.perf_counter() - embedded, 2),
        "cv5": cross_validate(vectors, examples),
    }
    return heads, info


def run(args: argparse.Namespace) -> int:
    """Train, save, evaluate, print JSON."""
    configure_logging("train-classifier")
    model_dir = ensure_minilm(args.model)
    embedder = Embedder.load(model_dir, threads=args.threads)
    heads, info = train(embedder, args.train)
    heads.save(args.out)
    engine = ClassifierEngine(embedder, heads)
    result = {"model": embedder.card.name, "heads": str(args.out), "train": info}
    result["test"] = evaluate(engine, read_examples(args.test))
    sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.train.classifier`."""
    parser = argparse.ArgumentParser(prog="python -m tools.train.classifier")
    parser.add_argument("--model", type=Path, default=None, help="exported MiniLM folder")
    parser.add_argument("--train", type=Path, default=TRAIN_PATH)
    parser.add_argument("--test", type=Path, default=TEST_PATH)
    parser.add_argument("--out", type=Path, default=HEADS_PATH, help="heads file to write")
    parser.add_argument("--threads", type=int, default=None)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
