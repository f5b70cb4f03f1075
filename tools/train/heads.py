"""Labelled examples and fitting of the Classifier Engine's heads (numpy softmax regression).

The service only reads what this makes (services/classifier/head.py); `python -m
tools.train.classifier` runs it on the shipped data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.classifier.complexity import length_features
from services.classifier.head import DATA_DIR, ClassifierHeads, SoftmaxHead, softmax
from services.classifier.labels import DIFFICULTIES, SUB_LABELS, fine_label

TEST_PATH = DATA_DIR / "test.jsonl"  # held out: used by evaluation only
# Embedded at training time and stored in the heads; the service embeds them again at load.
PROBE_TEXTS = (
    "Evaluate environmental risks for setting up an outdoor event.",
    "I have had a fever and a sore throat since yesterday.",
    "What is 17 times 23?",
)
# Chosen by 5-fold cross-validation on the train split only (see docs/classifier.md).
TOPIC_L2, DIFFICULTY_L2, STEPS = 1e-4, 1e-3, 300
BATCH = 32

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class Example:
    """One labelled query."""

    text: str
    domain: str
    sub: str
    difficulty: str


def read_examples(path: Path) -> list[Example]:
    """Examples from a JSON Lines file with text, domain, sub and difficulty."""
    return parse_examples(Path(path).read_bytes(), path)


def parse_examples(raw: bytes, source: Path | str = "<data>") -> list[Example]:
    """Examples from JSON Lines bytes; checks the labels."""
    examples = []
    for number, line in enumerate(raw.decode().splitlines(), 1):
        if line.strip():
            ex = Example(**json.loads(line))
            if ex.sub not in SUB_LABELS.get(ex.domain, ()) or ex.difficulty not in DIFFICULTIES:
                raise ValueError(f"{source}:{number}: unknown label in {ex}")
            examples.append(ex)
    return examples


def embed_batched(embed: Embed, texts: Sequence[str], batch: int = BATCH) -> np.ndarray:
    """Embed in batches, so that padding to the longest stays short."""
    parts = [embed(list(texts[i : i + batch])) for i in range(0, len(texts), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def fit_softmax(
    x: np.ndarray,
    y: Sequence[str],
    *,
    l2: float = 1e-3,
    steps: int = 300,
    lr: float = 0.1,
    balanced: bool = False,
) -> SoftmaxHead:
    """Fit by full-batch Adam on cross-entropy + L2; deterministic (zero start, no sampling)."""
    labels = tuple(sorted(set(y)))
    target = np.array([labels.index(v) for v in y])
    onehot = np.eye(len(labels))[target]
    sample_w = _sample_weights(target, len(labels), balanced)
    params = [np.zeros((x.shape[1], len(labels))), np.zeros(len(labels))]
    adam = _Adam(params, lr)
    for _ in range(steps):
        grad = (softmax(x @ params[0] + params[1]) - onehot) * sample_w[:, None]
        adam.step([x.T @ grad + l2 * params[0], grad.sum(axis=0)])
    return SoftmaxHead(labels, params[0].astype(np.float32), params[1].astype(np.float32))


def _sample_weights(target: np.ndarray, classes: int, balanced: bool) -> np.ndarray:
    """Per-row loss weights summing to 1; inverse class frequency when balanced."""
    counts = np.bincount(target, minlength=classes).astype(np.float64)
    w = 1.0 / counts[target] if balanced else np.ones(len(target))
    return w / w.sum()


class _Adam:
    """Adam updates in place on a list of arrays."""

    def __init__(self, params: list[np.ndarray], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: list[np.ndarray], b1: float = 0.9, b2: float = 0.999) -> None:
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**self.t), v / (1 - b2**self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def fit_heads(
    vectors: np.ndarray,
    examples: Sequence[Example],
    *,
    model: str,
    train_sha256: str,
    probes: np.ndarray,
) -> ClassifierHeads:
    """Train the topic and difficulty heads on precomputed embeddings."""
    texts = [e.text for e in examples]
    topic = fit_softmax(
        vectors, [fine_label(e.domain, e.sub) for e in examples], l2=TOPIC_L2, steps=STEPS
    )
    difficulty = fit_softmax(
        np.hstack([vectors, length_features(texts)]),
        [e.difficulty for e in examples],
        l2=DIFFICULTY_L2,
        steps=STEPS,
        balanced=True,  # medium dominates; unweighted, hard queries were mostly called medium
    )
    return ClassifierHeads(
        topic, difficulty, model, train_sha256, PROBE_TEXTS, probes.astype(np.float32)
    )


def train_heads(
    embed: Embed, train_path: Path, *, model: str
) -> tuple[ClassifierHeads, list[Example], np.ndarray]:
    """Heads fitted on every example of train_path (recording its hash), the examples, vectors."""
    raw = Path(train_path).read_bytes()  # hashed and parsed from the same bytes
    examples = parse_examples(raw, train_path)
    vectors = embed_batched(embed, [e.text for e in examples])
    heads = fit_heads(
        vectors,
        examples,
        model=model,
        train_sha256=hashlib.sha256(raw).hexdigest(),
        probes=embed(list(PROBE_TEXTS)),
    )
    return heads, examples, vectors
