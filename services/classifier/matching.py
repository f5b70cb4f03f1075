"""Knowledge gap and capability matching: pure functions over agent cards and label scores.

Scores (0..1) for an agent are the best over its declared domains of:
  P(domain) x 1.0 .. 0.5   declared the domain's sub-label: 1.0 for the most likely sub-label,
                           down to 0.5 for an unlikely one (a noise sensor for an air question)
  P(domain) x 0.8          declared the domain itself
  P(top domain) x 0.3      declared `general` (or `*`): a generalist, a fallback for anything
An agent whose declarations are all unknown names scores 0. Only declared domains and
sub-labels (not `general`) close a knowledge gap: a generalist lacks domain knowledge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.classifier.labels import resolve

SUB_WEIGHT_MIN = 0.5
DOMAIN_WEIGHT = 0.8
GENERALIST_WEIGHT = 0.3
MIN_SCORE = 0.1
WILDCARDS = frozenset({"*", "any"})


class AgentLike(Protocol):
    """What matching reads from an agent card (schemas.AgentCard fits)."""

    @property
    def agent(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def domains(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class AgentInfo:
    """A plain agent card for callers without the pydantic schema (CLI, tests, simulator)."""

    agent: str
    kind: str = "worker"
    domains: tuple[str, ...] = ()
    tokens_per_s: float | None = None
    concurrency: int | None = None


@dataclass(frozen=True)
class Match:
    """One agent that fits the query; `reason` is sub, domain or general."""

    agent: str
    kind: str
    score: float
    reason: str


@dataclass(frozen=True)
class Scores:
    """Label probabilities of one query: P(domain) and P(sub-label | domain)."""

    domain: Mapping[str, float]
    sub: Mapping[str, Mapping[str, float]]

    @property
    def top(self) -> str:
        """The most probable domain."""
        return max(self.domain, key=lambda d: self.domain[d])

    def sub_weight(self, domain: str, sub: str) -> float:
        """1.0 for the most likely sub-label of the domain, SUB_WEIGHT_MIN for an unlikely one."""
        probs = self.sub.get(domain, {})
        best = max(probs.values(), default=0.0)
        ratio = probs.get(sub, 0.0) / best if best > 0 else 0.0
        return SUB_WEIGHT_MIN + (1 - SUB_WEIGHT_MIN) * ratio


def covers(declared: Iterable[str], domain: str) -> bool:
    """Whether any declared name is the domain, one of its sub-labels or an alias of them."""
    return any((r := resolve(name)) is not None and r[0] == domain for name in declared)


def knowledge_gap(domain: str, agents: Iterable[AgentLike]) -> tuple[bool, tuple[str, ...]]:
    """(gap, agents covering the domain): gap when no agent declares it; `general` never gaps."""
    covering = tuple(a.agent for a in agents if covers(a.domains, domain))
    return (not covering and domain != "general"), covering


def agent_score(declared: Iterable[str], scores: Scores) -> tuple[float, str]:
    """Best (score, reason) over an agent's declared domains; (0.0, 'none') if none apply."""
    best = (0.0, "none")
    for name in declared:
        candidate = _entry_score(name, scores)
        if candidate[0] > best[0]:
            best = candidate
    return best


def _entry_score(name: str, scores: Scores) -> tuple[float, str]:
    if name.strip().lower() in WILDCARDS:
        return GENERALIST_WEIGHT * scores.domain[scores.top], "general"
    resolved = resolve(name)
    if resolved is None:
        return 0.0, "none"
    domain, sub = resolved
    p = scores.domain.get(domain, 0.0)
    own = (p * scores.sub_weight(domain, sub), "sub") if sub else (p * DOMAIN_WEIGHT, "domain")
    if domain == "general" and sub is None:
        fallback = (GENERALIST_WEIGHT * scores.domain[scores.top], "general")
        return max(own, fallback)
    return own


def match_agents(
    scores: Scores, agents: Iterable[AgentLike], *, min_score: float = MIN_SCORE
) -> list[Match]:
    """Agents scoring at least min_score, best first; ties go to the faster agent, then by id."""
    found = []
    for a in agents:
        score, reason = agent_score(a.domains, scores)
        if score >= min_score:
            speed = getattr(a, "tokens_per_s", None) or 0.0
            found.append((-score, -speed, a.agent, Match(a.agent, a.kind, round(score, 4), reason)))
    return [m for *_, m in sorted(found, key=lambda t: t[:3])]
