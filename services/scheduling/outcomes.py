"""How a request ends, what the cloud costs, and the counting shared by the simulator and the
live orchestrator.

Outcomes (exactly one per request):

| outcome | meaning | counted in |
| --- | --- | --- |
| `edge` | processed at an edge node | processed_edge |
| `cloud` | the policy sent it to the cloud directly | cloud |
| `rejected_to_cloud` | its node was full or its wait ran out; then cloud | rejected_edge, cloud |
| `rejected` | rejected at the edge and no cloud is configured | rejected_edge |
| `failed` | error or timeout (the cloud's included) | failed |

Cloud cost is charged for `cloud` and `rejected_to_cloud` only: prompt and output tokens at the
prices.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from schemas import Outcome

CLOUD_SERVED = frozenset({Outcome.CLOUD, Outcome.REJECTED_TO_CLOUD})


class Prices(BaseModel):
    """Cloud prices in USD per 1M tokens; the defaults are GPT-4 (8K) list prices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    usd_per_1m_input: float = Field(30.0, ge=0)
    usd_per_1m_output: float = Field(60.0, ge=0)

    def cost(self, prompt_tokens: int, output_tokens: int) -> float:
        """USD for one cloud call."""
        return (
            prompt_tokens * self.usd_per_1m_input + output_tokens * self.usd_per_1m_output
        ) / 1e6


@dataclass(slots=True)
class Tally:
    """Outcome counts, cloud spend and latencies of a set of requests."""

    counts: Counter[Outcome] = field(default_factory=Counter)
    cloud_cost_usd: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    def record(self, outcome: Outcome, *, latency_s: float | None, cost_usd: float = 0.0) -> None:
        """Count one request; `latency_s` is None when no answer came (rejected, failed)."""
        self.counts[outcome] += 1
        self.cloud_cost_usd += cost_usd
        if latency_s is not None:
            self.latencies_s.append(latency_s)

    def merge(self, other: Tally) -> Tally:
        """A new tally holding both."""
        return Tally(
            self.counts + other.counts,
            self.cloud_cost_usd + other.cloud_cost_usd,
            self.latencies_s + other.latencies_s,
        )

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, object]:
        """The report columns (the `edgecollab simulate --json` per-policy keys)."""
        c = self.counts
        lat = np.asarray(self.latencies_s, dtype=float)
        return {
            "requests": self.requests,
            "processed_edge": c[Outcome.EDGE],
            "rejected_edge": c[Outcome.REJECTED_TO_CLOUD] + c[Outcome.REJECTED],
            "cloud": c[Outcome.CLOUD] + c[Outcome.REJECTED_TO_CLOUD],
            "failed": c[Outcome.FAILED],
            "cloud_cost_usd": round(self.cloud_cost_usd, 6),
            "latency_mean_s": round(float(lat.mean()), 4) if lat.size else None,
            "latency_p95_s": round(float(np.percentile(lat, 95)), 4) if lat.size else None,
            "latency_p99_s": round(float(np.percentile(lat, 99)), 4) if lat.size else None,
            "outcomes": {o.value: c[o] for o in Outcome},
        }
