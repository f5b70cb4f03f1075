"""Provenance: one `Step` record per thing a query's answer was made of."""

from __future__ import annotations

import time
from typing import Literal

from schemas import Step

Where = Literal["edge", "cloud", "none"]
StepOutcome = Literal["ok", "rejected", "failed", "cached"]


def record(
    name: str,
    topic: str,
    agent: str | None,
    started: float | None,
    outcome: StepOutcome,
    *,
    where: Where = "edge",
    site: str | None = None,
    prompt_tokens: int = 0,
    output_tokens: int = 0,
    cost_usd: float = 0.0,
    detail: str | None = None,
    confidence: float | None = None,
) -> Step:
    """A step that began at `started` (time.perf_counter(); None: took no time) and ended now."""
    ms = 0.0 if started is None else round((time.perf_counter() - started) * 1000, 3)
    return Step(
        name=name,
        topic=topic,
        agent=agent,
        site=site,
        where=where,
        outcome=outcome,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        ms=ms,
        cost_usd=round(cost_usd, 8),
        detail=detail,
        confidence=confidence,
    )
