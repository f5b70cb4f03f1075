"""The Classifier Engine's trained heads: softmax layers over sentence embeddings, from one file.

`python -m tools.train.classifier` writes the heads file (`HEADS_PATH`) together with what it
was trained on: the SHA-256 of the training data, the embedder's name and the embedder's
vectors for a few probe sentences. The service only reads it (`load_heads`); nothing here
trains.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from services.classifier.labels import DOMAINS

log = structlog.get_logger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_PATH = DATA_DIR / "train.jsonl"
HEADS_PATH = DATA_DIR / "head.npz"
TRAIN_COMMAND = "python -m tools.train.classifier"
# Largest |difference| between the probe vectors at training time and now that is taken as the
# same embedder. fp32 runs here differ by at most 8.2e-8 (threads, graph optimisation levels, a
# float64 reference forward); noise of 1e-3 per component already flips a test prediction.
PROBE_TOLERANCE = 1e-4


class HeadsError(RuntimeError):
    """The heads file is missing, unreadable, or was made from other data or another embedder."""


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


@dataclass(frozen=True)
class ClassifierHeads:
    """The trained heads plus what they were trained on."""

    topic: SoftmaxHead  # labels 'domain/sub'; a domain's probability is the sum over its subs
    difficulty: SoftmaxHead  # over embedding + length features
    model: str  # the embedder's name (model.json)
    train_sha256: str  # of the training data file's bytes
    probe_texts: tuple[str, ...]
    probe_vectors: np.ndarray  # the embedder's output for probe_texts at training time

    def save(self, path: Path) -> None:
        """One .npz, loadable without pickle."""
        arrays: dict[str, Any] = {
            "model": np.array(self.model),
            "train_sha256": np.array(self.train_sha256),
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
        """Read what `save` wrote (KeyError for a file without one of its arrays)."""
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}

        def head(name: str) -> SoftmaxHead:
            labels = tuple(str(s) for s in arrays[f"{name}.labels"])
            return SoftmaxHead(labels, arrays[f"{name}.weight"], arrays[f"{name}.bias"])

        return cls(
            topic=head("topic"),
            difficulty=head("difficulty"),
            model=str(arrays["model"]),
            train_sha256=str(arrays["train_sha256"]),
            probe_texts=tuple(str(s) for s in arrays["probe_texts"]),
            probe_vectors=arrays["probe_vectors"],
        )


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_command(heads_path: Path, train_path: Path, model_dir: Path | None = None) -> str:
    """The command that remakes these heads (options only where they differ from the defaults)."""
    parts = [TRAIN_COMMAND]
    if model_dir is not None:
        parts.append(f"--model {model_dir}")
    if Path(train_path) != TRAIN_PATH:
        parts.append(f"--train {train_path}")
    if Path(heads_path) != HEADS_PATH:
        parts.append(f"--out {heads_path}")
    return " ".join(parts)


def load_heads(path: Path = HEADS_PATH, *, train_path: Path = TRAIN_PATH) -> ClassifierHeads:
    """The heads file, refused (HeadsError, one line) unless it was trained on train_path's data.

    When train_path does not exist there is nothing to compare with: the heads are taken as
    they are, with a warning.
    """
    path, train_path = Path(path), Path(train_path)
    remake = train_command(path, train_path)
    if not path.is_file():
        raise HeadsError(f"no heads file at {path}; make it with: {remake}")
    try:
        heads = ClassifierHeads.load(path)
    except KeyError as exc:
        raise HeadsError(
            f"heads file {path} lacks {exc} (an older format); remake it with: {remake}"
        ) from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split())  # one line
        raise HeadsError(
            f"cannot read heads file {path} ({reason}); remake it with: {remake}"
        ) from None
    if train_path.is_file():
        now = sha256_file(train_path)
        if heads.train_sha256 != now:
            raise HeadsError(
                f"heads file {path} was trained on other data than {train_path} "
                f"(sha256 {heads.train_sha256[:12] or 'none'} recorded, {now[:12]} now); "
                f"retrain it with: {remake}"
            )
    else:
        log.warning("classifier_train_data_missing", train=str(train_path), heads=str(path))
    return heads


def check_embedder(
    heads: ClassifierHeads,
    model: str,
    dims: int,
    *,
    heads_path: Path = HEADS_PATH,
    train_path: Path = TRAIN_PATH,
    model_dir: Path | None = None,
) -> None:
    """HeadsError (one line) unless the heads were trained on this embedder's name and width."""
    width = heads.topic.weight.shape[0]
    if heads.model != model or width != dims:
        raise HeadsError(
            f"heads file {heads_path} was trained on embedder {heads.model!r} "
            f"({width}-d), not {model!r} ({dims}-d); retrain it with: "
            f"{train_command(heads_path, train_path, model_dir)}"
        )


def probe_drift(heads: ClassifierHeads, embed: Callable[[list[str]], np.ndarray]) -> float:
    """Largest |difference| between the probe vectors stored in the heads and embed's now."""
    now = embed(list(heads.probe_texts))
    if now.shape != heads.probe_vectors.shape:
        return float("inf")
    return float(np.abs(now - heads.probe_vectors).max(initial=0.0))


def domain_probs(heads: ClassifierHeads, vectors: np.ndarray) -> np.ndarray:
    """P(domain) [n, len(DOMAINS)]: the topic head's probabilities summed over sub-labels."""
    fine = heads.topic.proba(vectors)
    owner = np.array([DOMAINS.index(label.split("/")[0]) for label in heads.topic.labels])
    out = np.zeros((fine.shape[0], len(DOMAINS)))
    np.add.at(out.T, owner, fine.T)
    return out
