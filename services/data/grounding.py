"""Grounding: what an answer says was measured comes from the readings, never from a model.

Pure functions (no bus), used by the orchestrator and by `edgecollab bench grounding`:

    f = fact("wearable-1", stream, samples)  # Fact: the window of one stream (None: no values)
    measured("health", facts)     # the measured part, composed by code: every alerted stream with
                                  # its value, unit, trend and the threshold it crossed
    clinician_report(facts)       # Fig. 5a's report for a clinician, one line per stream
    checked = check(text, facts)  # numbers with a unit in generated text against the facts:
                                  # a sentence citing one that matches no fact is removed
    compose("health", facts, advice=checked.text)   # the whole answer text
    sources(passages)             # "Sources: [WHO 2021] ..." for knowledge-base passages

With knowledge-base passages (schemas.Passage), `measured` puts each stream's reference range
beside its value ("normal at rest: 60-100 bpm [MedlinePlus]"), `check` also accepts a number
that a retrieved passage states (a range's end, or a number with that unit in its text:
retrieved, not measured, like a threshold), `compose` ends with the sources cited, and
`quoted(text, passages)` is an answer with no data: the model's checked text, the nearest
passage quoted with its citation, the sources.

A number with a unit (`148 bpm`, `39.1 °C`, `180 beats per minute`, `92%`, `100-130 bpm`) matches
a fact of that unit when it equals, to the decimals written, the fact's newest value, mean, lowest,
highest or alert threshold. Units checked: every stream's unit and spellings (docs/sensors.md),
and measurement units no stream has (°F, mmHg, mg/dL), which therefore never match. A dose
(`500 mg`) or a duration (`24 hours`) is not a reading and is not checked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from schemas import Fact, Passage
from services.data.features import Sample, trend, window_stats
from services.data.streams import STREAMS, Stream, lookup


def fact(agent: str, stream: Stream, samples: Sequence[Sample]) -> Fact | None:
    """The fact a window of readings supports; None when no reading carries a value."""
    stats = window_stats(stream, samples)
    if stats is None:
        return None
    timed = [s.ts for s in samples if s.value is not None]
    rule = stream.alert if stats.alert_now else None
    side = None
    if rule is not None:
        side = "above" if rule.above is not None and stats.last > rule.above else "below"
    return Fact(
        agent=agent,
        domain=stream.domain,
        stream=stream.name,
        label=stream.label,
        value=stats.last,
        unit=stream.unit,
        ts=timed[-1],
        since=timed[0],
        n=stats.n,
        mean=round(stats.mean, 4),
        low=stats.low,
        high=stats.high,
        trend=trend(stream, stats),  # type: ignore[arg-type]
        alert=rule.label if rule else None,
        threshold=(rule.above if side == "above" else rule.below) if rule else None,
        side=side,  # type: ignore[arg-type]
    )


def _stream(f: Fact) -> Stream | None:
    return lookup(f.domain, f.stream)


def number(f: Fact, value: float) -> str:
    """A value as the stream writes it (its decimals)."""
    stream = _stream(f)
    digits = stream.digits if stream else 1
    return f"{value:.{digits}f}"


def _value(f: Fact) -> str:
    """'heart rate 148 bpm'; '215 people in view' when the label names the unit."""
    if f.unit in f.label.split():
        return f"{number(f, f.value)} {f.label}"
    return f"{f.label} {number(f, f.value)} {f.unit}"


def _threshold(f: Fact) -> str:
    assert f.threshold is not None
    return f"{f.side} the {f.alert} threshold of {number(f, f.threshold)} {f.unit}"


def _alerts_first(facts: Iterable[Fact]) -> list[Fact]:
    return sorted(facts, key=lambda f: f.alert is None)  # stable: registry order otherwise


def _by_agent(facts: Iterable[Fact]) -> dict[str, list[Fact]]:
    agents: dict[str, list[Fact]] = {}
    for f in facts:
        agents.setdefault(f.agent, []).append(f)
    return agents


def _window(facts: Sequence[Fact]) -> str:
    n = max(f.n for f in facts)
    span = max(f.ts for f in facts) - min(f.since for f in facts)
    readings = f"{n} reading{'s' if n != 1 else ''}"
    return f"{readings}, last {span:.0f} s" if span >= 1 else readings


def measured(domain: str, facts: Sequence[Fact], *, passages: Sequence[Passage] = ()) -> str:
    """The measured part of an answer: health, per agent, every stream past its alert with
    value, unit, trend and threshold, then the rest; environment, each risk with its live
    number and sensor, then what is within limits; each with its reference range when a
    passage gives one."""
    if not facts:
        return "No readings were available."
    ref = _references(passages)
    if domain == "environment":
        return _city(facts, ref)
    lines = []
    for agent, own in _by_agent(facts).items():
        alerts = [f for f in own if f.alert]
        normal = [f for f in own if not f.alert]
        parts = [f"{_value(f)} ({f.trend}), {_threshold(f)}{ref(f, ', ', '')}" for f in alerts]
        line = f"Measured by {agent} ({_window(own)}): "
        line += "; ".join(parts) + "." if parts else "nothing past an alert threshold."
        if normal:
            within = "; ".join(_value(f) + ref(f, " (", ")") for f in normal)
            line += f" No alert: {within}."  # past no alert threshold, maybe outside its range
        lines.append(line)
    return "\n".join(lines)


def _city(facts: Sequence[Fact], ref: _Ref) -> str:
    risks = [f for f in facts if f.alert]
    calm = [f for f in facts if not f.alert]
    text = (
        "Risks now: "
        + "; ".join(
            f"{f.alert}: {_value(f)} ({f.agent}, {f.trend}), "
            f"{f.side} {number(f, f.threshold or 0.0)} {f.unit}{ref(f, ', ', '')}"
            for f in risks
        )
        + "."
        if risks
        else "No risk past a threshold now."
    )
    if calm:
        text += " Within limits: " + "; ".join(
            f"{_value(f)} ({f.agent}{ref(f, ', ', '')})" for f in calm
        )
        text += "."
    return text


_Ref = Callable[[Fact, str, str], str]


def _references(passages: Sequence[Passage]) -> _Ref:
    """fact, before, after → 'before<label> <range> [cite]after' from the passage giving the
    fact's stream a range in its unit ('' when none does)."""
    ranges = {(p.stream, p.unit): p for p in passages if p.stream and p.unit}

    def ref(f: Fact, before: str, after: str) -> str:
        p = ranges.get((f.stream, f.unit))
        return f"{before}{reference(p)}{after}" if p else ""

    return ref


def reference(p: Passage) -> str:
    """A passage's range as an answer cites it: 'normal at rest: 60-100 bpm [MedlinePlus]'."""
    if p.low is not None and p.high is not None:
        span = f"{p.low:g}-{p.high:g} {p.unit}"
    elif p.high is not None:
        span = f"at most {p.high:g} {p.unit}"
    else:
        span = f"at least {p.low:g} {p.unit}"
    return f"{p.label + ': ' if p.label else ''}{span} [{p.cite}]"


def cited(facts: Sequence[Fact], passages: Sequence[Passage]) -> list[Passage]:
    """The passages an answer cites: those near the question, and the references of its
    facts' streams."""
    measured = {(f.stream, f.unit) for f in facts}
    return [p for p in passages if p.matched == "text" or (p.stream, p.unit) in measured]


def quoted(text: str, passages: Sequence[Passage], *, removed: int = 0) -> str:
    """An answer from passages and no readings: the model's (checked) text, the passage nearest
    the question quoted with its citation, and the sources."""
    parts = [text]
    if removed:
        what = "1 generated sentence" if removed == 1 else f"{removed} generated sentences"
        parts.append(f"(Removed {what} citing a value that no passage states.)")
    near = [p for p in passages if p.matched == "text"]
    if near:
        best = max(near, key=lambda p: p.score)
        parts.append(f"From the knowledge base [{best.cite}], {best.title}: {best.text}")
    parts.append(sources(passages))
    return "\n\n".join(p for p in parts if p)


def sources(passages: Sequence[Passage]) -> str:
    """'Sources: [WHO 2021] World Health Organization, ...; [CDC] ...' ('' for none)."""
    named = dict.fromkeys((p.cite, p.source) for p in passages)
    return "Sources: " + "; ".join(f"[{c}] {s}" for c, s in named) if named else ""


def clinician_report(facts: Sequence[Fact]) -> str:
    """Fig. 5a's report: per agent and stream, the newest value, mean, range, trend, count
    and the alert with its threshold, all from the readings."""
    lines = ["Clinician report (from the readings):"]
    for agent, own in _by_agent(facts).items():
        start, end = min(f.since for f in own), max(f.ts for f in own)
        lines.append(f"{agent}, {_clock(start)}-{_clock(end)} UTC:")
        for f in _alerts_first(own):
            stats = (
                f"mean {number(f, f.mean)}, range {number(f, f.low)}-{number(f, f.high)}, "
                f"{f.trend}, {f.n} reading{'s' if f.n != 1 else ''}"
            )
            flag = "no alert"
            if f.alert and f.threshold is not None:
                flag = f"ALERT {f.alert} ({f.side} {number(f, f.threshold)} {f.unit})"
            lines.append(f"- {f.label}: {number(f, f.value)} {f.unit} ({stats}); {flag}")
    return "\n".join(lines)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


# -- checking numbers with units in generated text ------------------------------------------

# Spellings a model uses for each unit (beyond the registry's own), most specific first.
_PER_MIN = r"\s*(?:/|per|a|an)\s*min(?:ute)?"
_SPELLINGS: dict[str, tuple[str, ...]] = {
    "bpm": (r"beats" + _PER_MIN, r"bpm"),
    "breaths/min": (r"breaths?" + _PER_MIN, r"breaths"),
    "steps/min": (r"steps?" + _PER_MIN,),
    "%": (r"%", r"percent", r"per\s*cent"),
    "h": (r"h(?:ours?|rs?)?\s+(?:of\s+)?sleep",),
    "°C": (r"[°º]\s*(?-i:C)(?:elsius)?", r"deg(?:rees?)?\s*(?:(?-i:C)\b|celsius)", r"degC",
           r"celsius", r"(?-i:C)\b", r"degrees?"),
    "µg/m³": (r"[µμu]g\s*/\s*m(?:³|3|\^3)", r"micrograms?\s*(?:/|per)\s*cubic\s*met(?:er|re)s?"),
    "dB(A)": (r"dB\s*\(\s*A\s*\)", r"dBA", r"dB", r"decibels?"),
    "vehicles/min": (r"(?:vehicles?|veh|cars?)" + _PER_MIN,),
    "people": (r"people", r"persons?"),
    # Measurement units no stream has: a value in them was never measured.
    "°F": (r"[°º]\s*(?-i:F)(?:ahrenheit)?", r"deg(?:rees?)?\s*(?:(?-i:F)\b|fahrenheit)",
           r"fahrenheit", r"(?-i:F)\b"),
    "mmHg": (r"mm\s*Hg",),
    "mg/dL": (r"mg\s*/\s*dl",),
}  # fmt: skip


def _unit_pattern() -> str:
    spellings: list[tuple[str, str]] = []
    for unit, own in _SPELLINGS.items():
        spellings += [(unit, s) for s in own]
    for stream in STREAMS.values():  # the registry's accepted spellings, written literally
        for spelling in (stream.unit, *stream.aliases):
            if len(spelling) > 1:  # 'C' is in the table above, case-sensitively
                spellings.append((stream.unit, re.escape(spelling)))
    groups = {s: u for u, s in spellings}  # one alternative per spelling
    return "|".join(f"(?:{s})" for s in sorted(groups, key=len, reverse=True))


_CANONICAL: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"^(?:{s})$", re.IGNORECASE), unit)
    for unit, own in _SPELLINGS.items()
    for s in own
] + [
    (re.compile(re.escape(spelling) + "$", re.IGNORECASE), stream.unit)
    for stream in STREAMS.values()
    for spelling in (stream.unit, *stream.aliases)
]
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_CLAIM = re.compile(
    rf"(?<![\w.,])(?P<a>{_NUM})(?:\s*(?:-|–|to)\s*(?P<b>{_NUM}))?\s*(?P<unit>{_unit_pattern()})"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Claim:
    """A number with a unit found in text: `text` as written, the value, the canonical unit,
    and the decimals written (the precision it claims)."""

    text: str
    value: float
    unit: str
    decimals: int
    start: int
    end: int


def _canonical(spelling: str) -> str:
    spelling = " ".join(spelling.split())
    for pattern, unit in _CANONICAL:
        if pattern.match(spelling):
            return unit
    raise AssertionError(f"unit spelling {spelling!r} is in the pattern but not the table")


def claims(text: str) -> list[Claim]:
    """Every number with a unit in `text`; a range (`100-130 bpm`) gives both ends."""
    found = []
    for match in _CLAIM.finditer(text):
        unit = _canonical(match["unit"])
        for group in ("a", "b"):
            if (raw := match[group]) is not None:
                digits = raw.replace(",", "")
                decimals = len(digits.split(".")[1]) if "." in digits else 0
                found.append(
                    Claim(match[0], float(digits), unit, decimals, match.start(), match.end())
                )
    return found


def supported(claim: Claim, facts: Iterable[Fact], passages: Iterable[Passage] = ()) -> bool:
    """Whether a fact of the claim's unit has this value, to the decimals the claim wrote,
    as its newest value, mean, lowest, highest or alert threshold; or a passage's range in
    that unit ends there."""
    tolerance = 0.5 * 10**-claim.decimals + 1e-9
    values: list[tuple[str | None, float | None]] = [
        (f.unit, v) for f in facts for v in (f.value, f.mean, f.low, f.high, f.threshold)
    ]
    values += [(p.unit, v) for p in passages for v in (p.low, p.high)]
    values += [(c.unit, c.value) for p in passages for c in claims(p.text)]
    return any(
        unit == claim.unit and v is not None and abs(v - claim.value) <= tolerance
        for unit, v in values
    )


@dataclass(frozen=True, slots=True)
class Checked:
    """Generated text with every sentence citing an unsupported number removed."""

    text: str
    unverified: list[str]  # the claims removed, as written
    removed: int = 0  # sentences removed

    @property
    def verified(self) -> bool:
        return not self.unverified


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def check(text: str, facts: Sequence[Fact], passages: Sequence[Passage] = ()) -> Checked:
    """Remove each sentence of `text` that cites a number with a unit no fact (or retrieved
    range) supports."""
    unverified: list[str] = []
    lines, removed = [], 0
    for line in text.splitlines():
        kept = []
        for sentence in _SENTENCE_END.split(line.strip()):
            bad = [c.text for c in claims(sentence) if not supported(c, facts, passages)]
            if bad:
                removed += 1
                unverified += [b for b in dict.fromkeys(bad) if b not in unverified]
            elif sentence:
                kept.append(sentence)
        if kept:
            lines.append(" ".join(kept))
    return Checked("\n".join(lines).strip(), unverified, removed)


def compose(
    domain: str,
    facts: Sequence[Fact],
    *,
    advice: str | None,
    removed: int = 0,
    report: bool = False,
    missing: str | None = None,
    passages: Sequence[Passage] = (),
) -> str:
    """The answer: the measured part, the model's checked advice, the clinician report, the
    sources of the passages cited.

    `removed`: how many sentences the check took out (said, not repeated); `missing`: why
    there is no advice (the generation failed or was rejected)."""
    head = "Recommendation" if domain == "environment" else "Advice"
    parts = [measured(domain, facts, passages=passages)]
    if advice:
        parts.append(f"{head}: {advice}")
    elif missing:
        parts.append(f"({head.lower()} unavailable: {missing})")
    if removed:
        what = "1 generated sentence" if removed == 1 else f"{removed} generated sentences"
        parts.append(f"(Removed {what} citing a value that no reading supports.)")
    if report:
        parts.append(clinician_report(facts))
    if passages:
        parts.append(sources(cited(facts, passages)))
    return "\n\n".join(p for p in parts if p)
