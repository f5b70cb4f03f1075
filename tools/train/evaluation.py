"""Evaluation of the Classifier Engine's heads: reports, confusion matrices, cross-validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from services.classifier.complexity import length_features
from services.classifier.engine import ClassifierEngine
from services.classifier.head import ClassifierHeads, domain_probs
from services.classifier.labels import DIFFICULTIES, DOMAINS
from tools.train.heads import Example, fit_heads


def confusion(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts [true label, predicted label] in `labels` order."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t], index[p]] += 1
    return matrix


def report(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str] = DOMAINS
) -> dict[str, Any]:
    """Accuracy, per-label recall and precision, and the confusion matrix as lists."""
    matrix = confusion(truth, predicted, labels)
    diag = np.diag(matrix)
    recall = diag / np.maximum(matrix.sum(axis=1), 1)
    precision = diag / np.maximum(matrix.sum(axis=0), 1)
    return {
        "n": int(matrix.sum()),
        "accuracy": round(float(diag.sum() / max(matrix.sum(), 1)), 4),
        "labels": list(labels),
        "recall": {label: round(float(r), 4) for label, r in zip(labels, recall, strict=True)},
        "precision": {
            label: round(float(p), 4) for label, p in zip(labels, precision, strict=True)
        },
        "confusion": matrix.tolist(),
    }


def predict_labels(
    heads: ClassifierHeads, vectors: np.ndarray, texts: Sequence[str]
) -> list[tuple[str, str]]:
    """(domain, difficulty) per row: the batch path used for evaluation."""
    domains = [DOMAINS[i] for i in domain_probs(heads, vectors).argmax(axis=1)]
    difficulty = heads.difficulty.predict(np.hstack([vectors, length_features(texts)]))
    return list(zip(domains, difficulty, strict=True))


def cross_validate(
    vectors: np.ndarray, examples: Sequence[Example], *, folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """Mean held-out domain and difficulty accuracy over k folds of the given examples."""
    order = np.random.default_rng(seed).permutation(len(examples))
    domain_acc, difficulty_acc = [], []
    for fold in range(folds):
        held = order[fold::folds]
        kept = np.setdiff1d(order, held)
        heads = fit_heads(
            vectors[kept],
            [examples[i] for i in kept],
            model="cv",
            train_sha256="",
            probes=vectors[:1],
        )
        held_ex = [examples[i] for i in held]
        pred = predict_labels(heads, vectors[held], [e.text for e in held_ex])
        domain_acc.append(np.mean([p[0] == e.domain for p, e in zip(pred, held_ex, strict=True)]))
        difficulty_acc.append(
            np.mean([p[1] == e.difficulty for p, e in zip(pred, held_ex, strict=True)])
        )
    return {
        "domain": round(float(np.mean(domain_acc)), 4),
        "difficulty": round(float(np.mean(difficulty_acc)), 4),
    }


def evaluate(engine: ClassifierEngine, examples: Sequence[Example]) -> dict[str, Any]:
    """The whole engine on examples: domain report, sub-label and difficulty accuracy."""
    predictions = [
        r
        for i in range(0, len(examples), 32)
        for r in engine.classify_batch([e.text for e in examples[i : i + 32]])
    ]
    domain = report([e.domain for e in examples], [p.domain for p in predictions], DOMAINS)
    difficulty = report(
        [e.difficulty for e in examples],
        [p.complexity.difficulty for p in predictions],
        DIFFICULTIES,
    )
    subs = [e.sub == p.sub_labels[0] for e, p in zip(examples, predictions, strict=True)]
    return {
        "domain": domain,
        "sub_label_accuracy": round(sum(subs) / len(subs), 4),
        "difficulty": difficulty,
    }
