"""Labelled examples and head training for the Classifier Engine."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.classifier.complexity import length_features
from services.classifier.head import ClassifierHeads, fit_softmax
from services.classifier.labels import DIFFICULTIES, DOMAINS, SUB_LABELS, fine_label

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_PATH = DATA_DIR / "train.jsonl"
TEST_PATH = DATA_DIR / "test.jsonl"
HEADS_PATH = DATA_DIR / "head.npz"
# Embedded at training time and again at load: a different embedder gives different vectors.
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
    """Examples from JSON Lines with text, domain, sub and difficulty; checks the labels."""
    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            ex = Example(**json.loads(line))
            if ex.sub not in SUB_LABELS.get(ex.domain, ()) or ex.difficulty not in DIFFICULTIES:
                raise ValueError(f"{path}:{number}: unknown label in {ex}")
            examples.append(ex)
    return examples


def embed_batched(embed: Embed, texts: Sequence[str], batch: int = BATCH) -> np.ndarray:
    """Embed in batches, so that padding to the longest stays short."""
    parts = [embed(list(texts[i : i + batch])) for i in range(0, len(texts), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def fit_heads(
    vectors: np.ndarray, examples: Sequence[Example], *, model: str, probes: np.ndarray
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
    return ClassifierHeads(topic, difficulty, model, PROBE_TEXTS, probes.astype(np.float32))


def train_heads(embed: Embed, examples: Sequence[Example], *, model: str) -> ClassifierHeads:
    """Embed the examples and the probes, then fit the heads."""
    vectors = embed_batched(embed, [e.text for e in examples])
    return fit_heads(vectors, examples, model=model, probes=embed(list(PROBE_TEXTS)))


def probes_match(heads: ClassifierHeads, embed: Embed, tolerance: float = 1e-3) -> bool:
    """Whether this embedder reproduces the vectors the heads were trained on."""
    if heads.probe_texts != PROBE_TEXTS:
        return False
    now = embed(list(heads.probe_texts))
    return bool(
        now.shape == heads.probe_vectors.shape
        and np.abs(now - heads.probe_vectors).max() < tolerance
    )


def domain_probs(heads: ClassifierHeads, vectors: np.ndarray) -> np.ndarray:
    """P(domain) [n, len(DOMAINS)]: the topic head's probabilities summed over sub-labels."""
    fine = heads.topic.proba(vectors)
    owner = np.array([DOMAINS.index(label.split("/")[0]) for label in heads.topic.labels])
    out = np.zeros((fine.shape[0], len(DOMAINS)))
    np.add.at(out.T, owner, fine.T)
    return out
