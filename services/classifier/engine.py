"""The Classifier Engine: domain, complexity, knowledge gap and matching agents of a query.

`ClassifierEngine` owns the model side (MiniLM embeddings + trained heads) and turns texts into
`Prediction`s; `decide` is the pure rest (gap, matches, complexity) over a prediction and the
agent cards it is given, so the service, the CLI and the tests share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from schemas import Complexity
from services.classifier.complexity import estimate_complexity, length_features
from services.classifier.head import (
    HEADS_PATH,
    PROBE_TOLERANCE,
    TRAIN_PATH,
    ClassifierHeads,
    HeadsError,
    check_embedder,
    domain_probs,
    load_heads,
    probe_drift,
)
from services.classifier.inputs import MAX_QUERY_CHARS, ClassifierInputError, check_text
from services.classifier.labels import DOMAINS, SUB_LABELS
from services.classifier.matching import AgentLike, Match, Scores, knowledge_gap, match_agents
from services.core.embedder import Embedder

log = structlog.get_logger(__name__)

__all__ = [
    "MAX_QUERY_CHARS",
    "ClassificationResult",
    "ClassifierEngine",
    "ClassifierInputError",
    "HeadsError",
    "Prediction",
    "check_text",
    "decide",
]

SUB_LABEL_SHARE = 0.25  # a further sub-label is listed when P(sub | domain) reaches this


@dataclass(frozen=True)
class Prediction:
    """What the model says about one text, before any agent card is looked at."""

    text: str
    scores: Scores
    difficulty: dict[str, float]


@dataclass(frozen=True)
class ClassificationResult:
    """The engine's answer for one query."""

    domain: str
    sub_labels: tuple[str, ...]
    confidence: float
    domain_scores: dict[str, float]
    complexity: Complexity
    gap: bool
    covered_by: tuple[str, ...]
    matches: tuple[Match, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists for tuples)."""
        out = asdict(self)
        out["sub_labels"] = list(self.sub_labels)
        out["covered_by"] = list(self.covered_by)
        out["matches"] = [asdict(m) for m in self.matches]
        out["complexity"] = self.complexity.model_dump()
        return out


def decide(prediction: Prediction, agents: Iterable[AgentLike] = ()) -> ClassificationResult:
    """Domain, sub-labels, complexity, gap and ranked matches from a prediction and agent cards."""
    agents = list(agents)
    scores = prediction.scores
    domain = scores.top
    gap, covered_by = knowledge_gap(domain, agents)
    return ClassificationResult(
        domain=domain,
        sub_labels=sub_labels(scores, domain),
        confidence=round(float(scores.domain[domain]), 4),
        domain_scores={d: round(float(p), 4) for d, p in scores.domain.items()},
        complexity=estimate_complexity(prediction.text, domain, prediction.difficulty),
        gap=gap,
        covered_by=covered_by,
        matches=tuple(match_agents(scores, agents)),
    )


def sub_labels(scores: Scores, domain: str) -> tuple[str, ...]:
    """The domain's most likely sub-label, then any other reaching SUB_LABEL_SHARE."""
    probs = scores.sub.get(domain, {})
    ranked = sorted(probs, key=lambda s: -probs[s])
    return tuple(s for i, s in enumerate(ranked) if i == 0 or probs[s] >= SUB_LABEL_SHARE)


class ClassifierEngine:
    """MiniLM embeddings + trained heads; `classify` is safe to call from worker threads."""

    def __init__(self, embedder: Embedder, heads: ClassifierHeads) -> None:
        self.embedder = embedder
        self.heads = heads

    @classmethod
    def load(
        cls,
        model_dir: Path | str,
        *,
        heads_path: Path = HEADS_PATH,
        train_path: Path = TRAIN_PATH,
        threads: int | None = None,
        provider: str | None = None,
    ) -> ClassifierEngine:
        """Load the heads file and the embedder; never trains.

        HeadsError (one line, naming the command that remakes them) when the heads are missing,
        were trained on other data than train_path's or on another embedder. Probe vectors that
        drift beyond PROBE_TOLERANCE (other numerics) are only logged.
        """
        heads = load_heads(heads_path, train_path=train_path)  # before the 90 MB model
        embedder = Embedder.load(model_dir, threads=threads, provider=provider)
        check_embedder(
            heads,
            embedder.card.name,
            embedder.dims,
            heads_path=heads_path,
            train_path=train_path,
            model_dir=Path(model_dir),
        )
        drift = probe_drift(heads, embedder.embed)
        if drift > PROBE_TOLERANCE:
            log.warning(
                "classifier_probe_drift",
                heads=str(heads_path),
                max_abs_diff=drift,
                tolerance=PROBE_TOLERANCE,
                note="the embedder's numerics differ from training time; heads used as they are",
            )
        else:
            log.debug("classifier_heads_loaded", heads=str(heads_path), probe_drift=drift)
        return cls(embedder, heads)

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Label probabilities for each text (one embedding batch); texts must pass check_text."""
        if not texts:
            return []
        vectors = self.embedder.embed(list(texts))
        fine = self.heads.topic.proba(vectors)
        domains = domain_probs(self.heads, vectors)
        difficulty = self.heads.difficulty.proba(np.hstack([vectors, length_features(texts)]))
        return [
            Prediction(
                text,
                _scores(self.heads.topic.labels, domains[i], fine[i]),
                _named(self.heads.difficulty.labels, difficulty[i]),
            )
            for i, text in enumerate(texts)
        ]

    def classify(self, text: str, agents: Iterable[AgentLike] = ()) -> ClassificationResult:
        """Classify one query against the given agent cards."""
        return self.classify_batch([text], agents)[0]

    def classify_batch(
        self, texts: Sequence[str], agents: Iterable[AgentLike] = ()
    ) -> list[ClassificationResult]:
        """Classify several queries in one embedding batch (padded to the longest)."""
        checked = [check_text(t) for t in texts]
        agents = list(agents)
        return [decide(p, agents) for p in self.predict(checked)]


def _named(labels: Sequence[str], probs: np.ndarray) -> dict[str, float]:
    return {label: float(p) for label, p in zip(labels, probs, strict=True)}


def _scores(fine_labels: Sequence[str], domains: np.ndarray, fine: np.ndarray) -> Scores:
    """P(domain) and P(sub | domain) from the topic head's 'domain/sub' probabilities."""
    p_domain = _named(DOMAINS, domains)
    sub: dict[str, dict[str, float]] = {d: {} for d in SUB_LABELS}
    for label, p in zip(fine_labels, fine, strict=True):
        d, s = label.split("/")
        sub[d][s] = float(p) / p_domain[d] if p_domain[d] > 0 else 0.0
    return Scores(domain=p_domain, sub=sub)
