"""Window features shared by sensors and consumers: the stats-v1 embedding and text summaries.

All functions are pure: the same samples give the same vector and the same words on any device.

`stats-v1` embeds a window of numeric samples of a registered stream in 8 numbers, each
scaled by the stream's typical range [lo, hi] (span = hi - lo) so that streams of different
units are comparable and everyday values fall in about [0, 1]:

| # | feature | formula |
| --- | --- | --- |
| 0 | mean | (mean - lo) / span |
| 1 | spread | population std / span |
| 2 | min | (min - lo) / span |
| 3 | max | (max - lo) / span |
| 4 | last | (last - lo) / span |
| 5 | trend | least-squares slope x window duration / span (the change across the window) |
| 6 | alert share | fraction of samples past the stream's alert threshold |
| 7 | alert now | 1 when the last sample is past it, else 0 |

Numbers are rounded to 4 decimals (the vector travels as JSON).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.data.streams import Stream

STATS_MODEL = "stats-v1"
MODEL_DIMS: dict[str, int] = {STATS_MODEL: 8}  # the dimensionality each known model declares

_TREND = 0.05  # a change across the window above 5% of the typical span is a trend


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading as a window keeps it; `nbytes` is its size on the wire (0: unknown)."""

    ts: float
    value: float | None
    text: str | None = None
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Plain statistics of the numeric samples of a window."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    last: float
    change: float  # fitted change from the first to the last sample
    alert_share: float
    alert_now: bool


def window_stats(stream: Stream, samples: Sequence[Sample]) -> WindowStats | None:
    """Statistics of the samples that carry a value; None when none does."""
    points = [(s.ts, s.value) for s in samples if s.value is not None]
    if not points:
        return None
    values = [v for _, v in points]
    mean = sum(values) / len(values)
    hits = [stream.alert is not None and stream.alert.hit(v) for v in values]
    return WindowStats(
        n=len(values),
        mean=mean,
        std=math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
        low=min(values),
        high=max(values),
        last=values[-1],
        change=_slope(points) * (points[-1][0] - points[0][0]),
        alert_share=sum(hits) / len(hits),
        alert_now=hits[-1],
    )


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of value over time (0 for a single instant)."""
    t_mean = sum(t for t, _ in points) / len(points)
    v_mean = sum(v for _, v in points) / len(points)
    var = sum((t - t_mean) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - t_mean) * (v - v_mean) for t, v in points) / var


def embed(stream: Stream, samples: Sequence[Sample]) -> list[float] | None:
    """The stats-v1 vector of a window (see the module docstring); None without values."""
    stats = window_stats(stream, samples)
    if stats is None:
        return None
    lo, hi = stream.typical
    span = hi - lo
    vector = [
        (stats.mean - lo) / span,
        stats.std / span,
        (stats.low - lo) / span,
        (stats.high - lo) / span,
        (stats.last - lo) / span,
        stats.change / span,
        stats.alert_share,
        1.0 if stats.alert_now else 0.0,
    ]
    return [round(x, 4) for x in vector]


def trend(stream: Stream, stats: WindowStats) -> str:
    """'rising', 'falling' or 'steady' across the window."""
    threshold = _TREND * (stream.typical[1] - stream.typical[0])
    if stats.change > threshold:
        return "rising"
    if stats.change < -threshold:
        return "falling"
    return "steady"


def _num(stream: Stream, value: float) -> str:
    return f"{value:.{stream.digits}f}"


def describe(stream: Stream, samples: Sequence[Sample]) -> str | None:
    """'heart rate 112 bpm (mean 98, range 90-115, rising)'; None without values."""
    stats = window_stats(stream, samples)
    if stats is None:
        return None
    text = f"{stream.label} {_num(stream, stats.last)} {stream.unit}"
    if stats.n > 1:
        span = f"{_num(stream, stats.low)}-{_num(stream, stats.high)}"
        text += f" (mean {_num(stream, stats.mean)}, range {span}, {trend(stream, stats)})"
    caption = next((s.text for s in reversed(samples) if s.text), None)
    return f'{text}, caption "{caption}"' if caption else text


def alert(stream: Stream, samples: Sequence[Sample]) -> str | None:
    """'fever (body temperature 38.6 °C, above 38.0)' when the last value is past the alert."""
    stats = window_stats(stream, samples)
    if stats is None or stream.alert is None or not stats.alert_now:
        return None
    rule = stream.alert
    side = f"above {rule.above}" if rule.above is not None and stats.last > rule.above else ""
    side = side or f"below {rule.below}"
    return f"{rule.label} ({stream.label} {_num(stream, stats.last)} {stream.unit}, {side})"


def describe_agent(agent: str, windows: Sequence[tuple[Stream, Sequence[Sample]]]) -> str:
    """One line of facts about an agent's recent data, for a person or an SLM prompt."""
    parts = [p for stream, samples in windows if (p := describe(stream, samples))]
    if not parts:
        return f"{agent}: no recent readings."
    first = min((s[0].ts for _, s in windows if s), default=0.0)
    last = max((s[-1].ts for _, s in windows if s), default=0.0)
    alerts = [a for stream, samples in windows if (a := alert(stream, samples))]
    span = f", last {round(last - first)} s" if last - first >= 1 else ""
    text = f"{agent}{span}: " + "; ".join(parts) + "."
    return text + (" Alerts: " + "; ".join(alerts) + "." if alerts else " No alerts.")
