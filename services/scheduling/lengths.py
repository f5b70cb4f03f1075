"""Output lengths a scheduler can know: a predicted distribution, learned online, re-estimated
as a request runs.

A live orchestrator does not know how long an answer will be: generation stops at EOS when the
model decides, or at `max_tokens`. What it knows at arrival is the prompt, `max_tokens` and the
Classifier Engine's domain and difficulty. `LengthPredictor` learns, from the lengths of
finished requests, one histogram per (domain), (domain, difficulty) and (model, domain,
difficulty), each shrunk towards its parent by a prior of `prior_weight` pseudo-requests, the
root towards a broad log-normal. A prediction is a `LengthEstimate`: a discrete distribution
over lengths, capped at `max_tokens`. Its `expected_total(progress)` is the mean length given
that the request has already produced `progress` tokens without ending (a request that has
run long is likely to run longer), which is piecewise constant in `progress`: it only changes
when `progress` passes one of the distribution's support points, so the `Fleet` re-estimates
an in-flight request only then.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_EPS = 1e-9
_PRUNE = 1e-3  # support points with less mass are dropped (the cap stands for the tail)
EDGE_MODEL = "slm"  # the model key of a node whose card names no model
CLOUD_MODEL = "cloud"  # the model key of the cloud's answers
COMPLETE: frozenset[str] = frozenset({"stop", "length"})  # finish reasons of a whole answer


class LengthEstimate:
    """A distribution over output lengths (tokens), capped at `cap` (the request's max_tokens).

    `exact` marks a point estimate that never changes with progress (the oracle's true length,
    or `max_tokens` alone).
    """

    __slots__ = ("_arrays", "_mass", "_tail", "cap", "exact", "mean", "probs", "support")

    def __init__(
        self, support: Sequence[float], probs: Sequence[float], cap: float, *, exact: bool = False
    ) -> None:
        if not support or len(support) != len(probs):
            raise ValueError("a length estimate needs matching, non-empty support and probs")
        self.support = tuple(float(x) for x in support)
        total = float(sum(probs))
        self.probs = tuple(float(p) / total for p in probs)
        self.cap = float(cap)
        self.exact = exact
        # _tail[j]: mean of the lengths >= support[j] (the expected total once past support[j-1]);
        # _mass[j]: their probability
        tail, masses, mass, moment = [0.0] * len(self.support), [0.0] * len(self.support), 0.0, 0.0
        for j in range(len(self.support) - 1, -1, -1):
            mass += self.probs[j]
            moment += self.probs[j] * self.support[j]
            tail[j], masses[j] = moment / mass, mass
        self._tail, self._mass = tuple(tail), tuple(masses)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self.mean = tail[0]

    @classmethod
    def exactly(cls, tokens: float, cap: float | None = None) -> LengthEstimate:
        """A point estimate: `tokens` for sure."""
        return cls((tokens,), (1.0,), cap if cap is not None else tokens, exact=True)

    def quantile(self, q: float) -> float:
        """The smallest support point with at least `q` of the mass at or below it."""
        acc = 0.0
        for x, p in zip(self.support, self.probs, strict=True):
            acc += p
            if acc >= q - _EPS:
                return x
        return self.support[-1]

    @property
    def std(self) -> float:
        """Standard deviation: the estimate's uncertainty, in tokens."""
        var = sum(p * (x - self.mean) ** 2 for x, p in zip(self.support, self.probs, strict=True))
        return math.sqrt(var)

    def expected_total(self, progress: float) -> tuple[float, float]:
        """(expected length given `progress` tokens done and not ended, the progress at which
        that expectation next changes). Past every support point the request is assumed to
        run to `min(cap, 2 * progress)`; past the cap it ends at once."""
        if self.exact:
            return self.support[0], math.inf
        j = bisect.bisect_right(self.support, progress + _EPS)
        if j < len(self.support):
            return self._tail[j], self.support[j]
        if progress < self.cap:
            return min(self.cap, max(2.0 * progress, progress + 1.0)), self.cap
        return progress + 1.0, math.inf

    def given(self, progress: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(support, probabilities) of the length given `progress` tokens done and not ended;
        past every support point, the single length `expected_total` assumes."""
        if self.exact:
            return self.support, self.probs
        j = bisect.bisect_right(self.support, progress + _EPS)
        if j == len(self.support):
            return (self.expected_total(progress)[0],), (1.0,)
        if j == 0:
            return self.support, self.probs
        mass = self._mass[j]
        return self.support[j:], tuple(p / mass for p in self.probs[j:])

    def given_cdf(self, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """`given` as numpy arrays: (support, cumulative probabilities)."""
        if self._arrays is None:
            self._arrays = (np.asarray(self.support), np.cumsum(self.probs))
        support, cdf = self._arrays
        if self.exact:
            return support, cdf
        j = bisect.bisect_right(self.support, progress + _EPS)
        if j == 0:
            return support, cdf
        if j == len(self.support):
            return np.array([self.expected_total(progress)[0]]), np.ones(1)
        return support[j:], (cdf[j:] - cdf[j - 1]) / self._mass[j]

    def remaining(self, progress: float) -> float:
        """Expected tokens still to come after `progress`."""
        return max(self.expected_total(progress)[0] - progress, 0.0)

    def __repr__(self) -> str:
        kind = "exactly" if self.exact else "about"
        return f"LengthEstimate({kind} {self.mean:.1f} of <= {self.cap:g})"


@dataclass(slots=True)
class _Histogram:
    counts: np.ndarray
    sums: np.ndarray

    @property
    def n(self) -> float:
        return float(self.counts.sum())


class LengthPredictor:
    """Online output-length statistics per (model, domain, difficulty), with backoff.

    Lengths go into log-spaced bins (`bins_per_octave` per doubling); each bin keeps its count
    and the sum of its lengths, so a length seen often (e.g. exactly 200) stays exact. A key's
    distribution is its counts plus `prior_weight` pseudo-requests drawn from its parent's
    (model, domain, difficulty) -> (domain, difficulty) -> (domain) -> all -> a log-normal of
    median `prior_median` and log-sd `prior_sigma`. Memory: 2 arrays of ~50 floats per key.
    A prediction is recomputed once the counts under its key, or all counts, grew by 1% (at
    every new observation below 100): a few more observations change nothing that matters.
    """

    def __init__(
        self,
        *,
        prior_weight: float = 5.0,
        prior_median: float = 128.0,
        prior_sigma: float = 1.0,
        bins_per_octave: int = 4,
        max_length: int = 8192,
    ) -> None:
        if prior_weight <= 0 or prior_median < 1 or prior_sigma <= 0 or bins_per_octave < 1:
            raise ValueError("prior_weight, prior_sigma > 0; prior_median >= 1; bins >= 1")
        self.prior_weight = prior_weight
        self.bins_per_octave = bins_per_octave
        self.max_length = max_length
        self.bins = int(math.log2(max_length) * bins_per_octave) + 1
        edges = 2.0 ** (np.arange(self.bins + 1) / bins_per_octave)
        edges[0] = 0.5
        centers = np.sqrt(edges[:-1] * edges[1:])
        z = (np.log(edges) - math.log(prior_median)) / prior_sigma
        cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
        mass = np.diff(cdf)
        mass[-1] += 1.0 - cdf[-1]
        mass /= mass.sum()
        self._prior = (mass, mass * centers)
        self._keys: dict[tuple[str | None, ...], _Histogram] = {}
        self._cache: dict[tuple[object, ...], tuple[float, float, LengthEstimate]] = {}
        self.observed = 0

    def bin_of(self, length: float) -> int:
        """The histogram bin of a length (>= 1 token)."""
        return min(int(math.log2(max(length, 1.0)) * self.bins_per_octave), self.bins - 1)

    @staticmethod
    def _chain(
        domain: str | None, difficulty: str | None, model: str | None
    ) -> list[tuple[str | None, ...]]:
        """Keys from the most general to the most specific that apply."""
        chain: list[tuple[str | None, ...]] = [()]
        if domain is None:
            return chain
        chain.append((domain,))
        if difficulty is None:
            return chain
        chain.append((domain, difficulty))
        if model is not None:
            chain.append((domain, difficulty, model))
        return chain

    def observe(
        self,
        length: int,
        *,
        domain: str | None = None,
        difficulty: str | None = None,
        model: str | None = None,
    ) -> None:
        """A request finished with `length` output tokens (by EOS or max_tokens, not cut off)."""
        if not 1 <= length <= self.max_length:
            return
        b = self.bin_of(length)
        for key in self._chain(domain, difficulty, model):
            h = self._keys.get(key)
            if h is None:
                h = self._keys[key] = _Histogram(np.zeros(self.bins), np.zeros(self.bins))
            h.counts[b] += 1.0
            h.sums[b] += length
        self.observed += 1

    def count(
        self, domain: str | None = None, difficulty: str | None = None, model: str | None = None
    ) -> int:
        """Requests observed under the most specific key given."""
        h = self._keys.get(self._chain(domain, difficulty, model)[-1])
        return int(h.n) if h else 0

    def distribution(
        self, domain: str | None = None, difficulty: str | None = None, model: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mass per bin, mean length per bin) of the posterior at the given key."""
        mass, moment = self._prior
        for key in self._chain(domain, difficulty, model):
            h = self._keys.get(key)
            if h is None:
                continue
            w = self.prior_weight
            total = h.n + w
            mass, moment = (h.counts + w * mass) / total, (h.sums + w * moment) / total
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(mass > 0, moment / mass, 0.0)
        return mass, means

    def predict(
        self,
        *,
        max_tokens: int,
        domain: str | None = None,
        difficulty: str | None = None,
        model: str | None = None,
    ) -> LengthEstimate:
        """The length distribution of a new request, capped at its `max_tokens`."""
        key = (domain, difficulty, model, max_tokens)
        own = self._keys.get(self._chain(domain, difficulty, model)[-1])
        n_key, n_all = (own.n if own else 0.0), float(self.observed)
        cached = self._cache.get(key)
        if cached is not None and _fresh(cached[0], n_key) and _fresh(cached[1], n_all):
            return cached[2]
        mass, means = self.distribution(domain, difficulty, model)
        keep = mass >= _PRUNE
        over = means >= max_tokens
        capped = float(mass[over].sum())  # what would run past the cap stops at it
        keep &= ~over
        support, probs = means[keep].tolist(), mass[keep].tolist()
        if capped >= _PRUNE or not support:
            support.append(float(max_tokens))
            probs.append(max(capped, _PRUNE))
        estimate = LengthEstimate(support, probs, max_tokens)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (n_key, n_all, estimate)
        return estimate


def _fresh(then: float, now: float) -> bool:
    """A cached prediction stands while its counts grew by at most 1% (none below 100)."""
    return now - then <= (0.01 * then if then >= 100 else 0.0)


def prediction_errors(predicted: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    """How well point predictions match true lengths: MAPE (mean |pred - true| / true), the
    pairwise order accuracy (of the pairs with different true lengths, the share the
    predictions put in the same order; a tie in prediction counts half) and Kendall's tau-b."""
    p, t = np.asarray(predicted, dtype=float), np.asarray(true, dtype=float)
    if p.size < 2:
        return {"requests": int(p.size), "mape": math.nan, "pairwise": math.nan, "tau_b": math.nan}
    mape = float(np.mean(np.abs(p - t) / t))
    concordant = tied_p = 0.0
    seen = np.empty(0)
    for value in np.unique(t):  # pairs (earlier group, this group): true order is "less"
        group = np.sort(p[t == value])
        lo = np.searchsorted(seen, group, side="left")
        hi = np.searchsorted(seen, group, side="right")
        concordant += float(lo.sum())
        tied_p += float((hi - lo).sum())
        seen = np.sort(np.concatenate([seen, group]), kind="mergesort")
    n0 = p.size * (p.size - 1) / 2
    n_t = sum(c * (c - 1) / 2 for c in np.unique(t, return_counts=True)[1].tolist())
    n_p = sum(c * (c - 1) / 2 for c in np.unique(p, return_counts=True)[1].tolist())
    pairs = n0 - n_t
    discordant = pairs - concordant - tied_p
    denominator = math.sqrt((n0 - n_t) * (n0 - n_p))
    return {
        "requests": int(p.size),
        "mape": round(mape, 4),
        "pairwise": round((concordant + 0.5 * tied_p) / pairs, 4) if pairs else math.nan,
        "tau_b": round((concordant - discordant) / denominator, 4) if denominator else math.nan,
    }
