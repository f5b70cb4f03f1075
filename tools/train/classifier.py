"""Train the Classifier Engine's heads on the shipped train split and evaluate on the test split.

`python -m tools.train.classifier [--model DIR] [--out FILE]` writes the heads file (default
services/classifier/data/head.npz, the one the service loads) with the SHA-256 of the train
split and the embedder's name, and prints one JSON report: 5-fold cross-validation on the train
split, then domain, sub-label and difficulty accuracy and the domain confusion matrix on the
test split, which training never sees.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from services.classifier.engine import ClassifierEngine
from services.classifier.head import HEADS_PATH, TRAIN_PATH, ClassifierHeads
from services.core.embedder import Embedder
from services.core.logging import configure_logging
from tools.export.packages import ensure_minilm
from tools.train.evaluation import cross_validate, evaluate
from tools.train.heads import TEST_PATH, read_examples, train_heads


def train(embedder: Embedder, train_path: Path) -> tuple[ClassifierHeads, dict[str, Any]]:
    """Fit the heads on every train example; also cross-validate them."""
    started = time.perf_counter()
    heads, examples, vectors = train_heads(embedder.embed, train_path, model=embedder.card.name)
    info = {
        "examples": len(examples),
        "sha256": heads.train_sha256,
        "train_s": round(time.perf_counter() - started, 2),
        "cv5": cross_validate(vectors, examples),
    }
    return heads, info


def save(heads: ClassifierHeads, out: Path) -> None:
    """Write the heads file whole or not at all (the service may be reading the old one)."""
    partial = out.with_name(out.name + ".partial")
    heads.save(partial)
    os.replace(partial, out)


def run(args: argparse.Namespace) -> int:
    """Train, save, evaluate, print JSON."""
    configure_logging("train-classifier")
    model_dir = ensure_minilm(args.model)
    embedder = Embedder.load(model_dir, threads=args.threads)
    heads, info = train(embedder, args.train)
    save(heads, args.out)
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
