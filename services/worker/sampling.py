"""Sampling parameters and next-token choice over one row of logits (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

import numpy as np

from schemas import SamplingOptions

_CANDIDATES = 256  # top-p looks at this many best tokens first and sorts everything only if needed
# The knowledge-gap signal looks at this many first generated tokens. Chosen on half of the
# facts set (AUROC 0.87 at 32 against 0.73 at 8 and 0.81 at 16), checked on the other half
# (0.76 against 0.61): a model unsure of a fact rambles, and that shows past the first words.
SIGNAL_TOKENS = 32


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens; temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens through end-of-sequence tokens (benchmarks)

    def __post_init__(self) -> None:
        """The bounds are the wire's (SamplingOptions); a ValueError names the one broken."""
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError("max_tokens must be an integer >= 1")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        SamplingOptions(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=list(self.stop),
        )

    @classmethod
    def resolve(cls, options: SamplingOptions, *, max_tokens: int) -> Self:
        """A request's resolved options as parameters (unset: greedy, no penalty)."""
        return cls(
            max_tokens=max_tokens,
            temperature=options.temperature or 0.0,
            top_k=options.top_k or 0,
            top_p=options.top_p or 1.0,
            repetition_penalty=options.repetition_penalty or 1.0,
            seed=options.seed,
            stop=tuple(options.stop),
        )


class Sampler:
    """Picks each next token of one request; keeps its own RNG and the tokens seen so far, and
    the model's own certainty about its first tokens (the knowledge-gap signal)."""

    def __init__(self, params: SamplingParams, vocab: int, prompt: list[int]) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.seen = np.zeros(vocab, bool) if params.repetition_penalty != 1.0 else None
        if self.seen is not None:
            self.seen[prompt] = True
        self.signal = Signal()

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        raw = logits
        if self.seen is not None:
            logits = _penalize(logits, self.seen, p.repetition_penalty)
        token = int(np.argmax(logits)) if p.temperature == 0 else self._sample(logits)
        if self.seen is not None:
            self.seen[token] = True
        if len(self.signal.probs) < SIGNAL_TOKENS:
            self.signal.add(raw, token)
        return token

    def _sample(self, logits: np.ndarray) -> int:
        p = self.params
        if 0 < p.top_k < len(logits):
            pool = np.argpartition(logits, -p.top_k)[-p.top_k :]
        else:
            pool = np.arange(len(logits))
        scaled = logits[pool].astype(np.float64) / p.temperature
        weights = np.exp(scaled - scaled.max())
        if p.top_p < 1.0:
            pool, weights = _nucleus(pool, weights, p.top_p)
        return int(pool[self.rng.choice(len(pool), p=weights / weights.sum())])


def _nucleus(pool: np.ndarray, weights: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most likely tokens whose probability reaches top_p."""
    total = weights.sum()
    head = np.arange(len(weights))
    if len(weights) > _CANDIDATES:
        best = np.argpartition(weights, -_CANDIDATES)[-_CANDIDATES:]
        head = best if weights[best].sum() >= top_p * total else head
    order = head[np.argsort(-weights[head])]
    cumulative = np.cumsum(weights[order]) / total
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    return pool[keep], weights[keep]


def _penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style repetition penalty on every token already in the sequence."""
    out = logits.copy()
    picked = out[seen]
    out[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


@dataclass
class Signal:
    """How sure the model was of its first SIGNAL_TOKENS tokens, from its raw distribution
    (temperature 1, no penalty): each chosen token's probability and each step's entropy."""

    probs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)

    def add(self, logits: np.ndarray, token: int) -> None:
        shifted = logits.astype(np.float64) - float(logits.max())
        weights = np.exp(shifted)
        total = float(weights.sum())
        p = weights / total
        self.probs.append(float(p[token]))
        self.entropies.append(float(np.log(total) - float((p * shifted).sum())))

    @property
    def confidence(self) -> float | None:
        """The mean probability of the first tokens (None before any token)."""
        return round(sum(self.probs) / len(self.probs), 4) if self.probs else None

    @property
    def entropy(self) -> float | None:
        """Their mean entropy in nats."""
        return round(sum(self.entropies) / len(self.entropies), 4) if self.entropies else None
