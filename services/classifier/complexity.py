"""Complexity of a query: difficulty (from a head) and expected output tokens (from a table)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np

from schemas import Complexity
from schemas.messages import Difficulty

# The paper's token demands; expected_tokens is always one of them, so the scheduler and the
# simulator see the same buckets.
TOKEN_BINS = (50, 100, 200, 300, 500)
# Index into TOKEN_BINS for (domain, difficulty): answers to arithmetic are short, to code long.
BASE_BIN: dict[str, dict[str, int]] = {
    "health": {"easy": 1, "medium": 2, "hard": 3},
    "environment": {"easy": 1, "medium": 2, "hard": 3},
    "math": {"easy": 0, "medium": 1, "hard": 3},
    "code": {"easy": 1, "medium": 3, "hard": 4},
    "general": {"easy": 0, "medium": 2, "hard": 3},
}
LONG_CUES = re.compile(
    r"\b(in detail|detailed|step by step|show your work|essay|report|comprehensive|thorough"
    r"|\d+[- ]word|\w+-page|itinerary|timeline|checklist|program|briefing)\b",
    re.IGNORECASE,
)
SHORT_CUES = re.compile(
    r"\b(briefly|in brief|one sentence|one word|short answer|yes or no|just the number|tl;?dr)\b",
    re.IGNORECASE,
)


def length_features(texts: Sequence[str]) -> np.ndarray:
    """Two features per text that the difficulty head sees besides the embedding."""
    words = np.array([len(t.split()) for t in texts], dtype=np.float32)
    return np.stack([np.log1p(words) / 3.0, (words > 20).astype(np.float32)], axis=1)


def expected_tokens(text: str, domain: str, difficulty: str) -> int:
    """Table value for (domain, difficulty), one bin up or down on explicit length cues."""
    index = BASE_BIN.get(domain, BASE_BIN["general"])[difficulty]
    index += bool(LONG_CUES.search(text)) - bool(SHORT_CUES.search(text))
    return TOKEN_BINS[min(max(index, 0), len(TOKEN_BINS) - 1)]


def estimate_complexity(
    text: str, domain: str, difficulty_probs: Mapping[str, float]
) -> Complexity:
    """The most probable difficulty and the token count it implies for this domain."""
    difficulty = cast(Difficulty, max(difficulty_probs, key=lambda k: difficulty_probs[k]))
    return Complexity(
        expected_tokens=expected_tokens(text, domain, difficulty),
        difficulty=difficulty,
        confidence=round(float(difficulty_probs[difficulty]), 4),
    )
