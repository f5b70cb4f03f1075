"""Light classification heads over sentence embeddings: multinomial logistic regression in numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SoftmaxHead:
    """Linear layer + softmax: `labels[k]` scores `x @ weight[:, k] + bias[k]`."""

    labels: tuple[str, ...]
    weight: np.ndarray  # [dims, classes]
    bias: np.ndarray  # [classes]

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities [n, classes] for embeddings [n, dims]."""
        return softmax(np.atleast_2d(x) @ self.weight + self.bias)

    def predict(self, x: np.ndarray) -> list[str]:
        """The most probable label of each row."""
        return [self.labels[i] for i in self.proba(x).argmax(axis=1)]


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


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


@dataclass(frozen=True)
class ClassifierHeads:
    """The trained heads plus what they were trained on (the embedder's name and probe vectors)."""

    topic: SoftmaxHead  # labels 'domain/sub'; a domain's probability is the sum over its subs
    difficulty: SoftmaxHead  # over embedding + length features
    model: str
    probe_texts: tuple[str, ...]
    probe_vectors: np.ndarray  # the embedder's output for probe_texts at training time

    def save(self, path: Path) -> None:
        """One .npz, loadable without pickle."""
        arrays: dict[str, Any] = {
            "model": np.array(self.model),
            "probe_texts": np.array(self.probe_texts),
            "probe_vectors": self.probe_vectors,
        }
        for name, head in (("topic", self.topic), ("difficulty", self.difficulty)):
            arrays[f"{name}.labels"] = np.array(head.labels)
            arrays[f"{name}.weight"] = head.weight
            arrays[f"{name}.bias"] = head.bias
        with Path(path).open("wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: Path) -> ClassifierHeads:
        """Read what `save` wrote."""
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}

        def head(name: str) -> SoftmaxHead:
            labels = tuple(str(s) for s in arrays[f"{name}.labels"])
            return SoftmaxHead(labels, arrays[f"{name}.weight"], arrays[f"{name}.bias"])

        return cls(
            topic=head("topic"),
            difficulty=head("difficulty"),
            model=str(arrays["model"]),
            probe_texts=tuple(str(s) for s in arrays["probe_texts"]),
            probe_vectors=arrays["probe_vectors"],
        )
