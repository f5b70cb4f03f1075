"""How a simulated device samples its streams: a daily rhythm, events, and AR(1) noise.

The parameters of each stream (base, amplitude, shape, event effects) are in the registry
(`services.data.streams`); this module turns them into readings over time.
"""

from __future__ import annotations

import math
import random
import time

from services.data.streams import Shape, Stream

_NOISE_MEMORY = 0.9  # AR(1) coefficient: sensor noise drifts rather than jumping
_PLACES = ("the stadium gate", "the main square", "the central station", "the riverside park")


def hour_of_day(t: float) -> float:
    """Local hour of day in [0, 24) of epoch seconds `t`."""
    local = time.localtime(t)
    return local.tm_hour + local.tm_min / 60 + local.tm_sec / 3600


def daily(shape: Shape, hour: float) -> float:
    """The daily rhythm in [0, 1] at `hour`."""
    diurnal = 0.5 + 0.5 * math.cos(2 * math.pi * (hour - 15) / 24)  # peak 15:00, low 03:00
    if shape == "diurnal":
        return diurnal
    if shape == "rush_hour":  # morning and evening peaks over a daytime floor
        peak = max(math.exp(-(((hour - h) / 1.5) ** 2)) for h in (8.5, 18.0))
        return 0.25 * diurnal + 0.75 * peak
    if shape == "awake":  # 07:00-23:00 with soft edges
        return 1 / (1 + math.exp(-3 * (hour - 7))) - 1 / (1 + math.exp(-3 * (hour - 23)))
    return 0.0


def expected(stream: Stream, t: float, event: str | None = None, intensity: float = 0.0) -> float:
    """The noiseless value at epoch seconds `t`, with `event` at `intensity` in [0, 1]."""
    value = stream.base + stream.amplitude * daily(stream.shape, hour_of_day(t))
    return value + stream.effects.get(event or "", 0.0) * intensity


def clip(stream: Stream, value: float) -> float:
    """Rounded to the stream's digits and held inside its physical bounds."""
    return round(min(max(value, stream.bounds[0]), stream.bounds[1]), stream.digits)


def event_intensity(
    elapsed_s: float, *, after_s: float, for_s: float, every_s: float, ramp_s: float
) -> float:
    """How strongly a scheduled event acts `elapsed_s` after start, in [0, 1].

    It starts `after_s` in, ramps up over `ramp_s`, lasts `for_s` (0: forever) and repeats
    every `every_s` (0: once).
    """
    if elapsed_s < after_s:
        return 0.0
    since = elapsed_s - after_s
    if every_s > 0:
        since %= every_s
    if for_s > 0 and since >= for_s:
        return 0.0
    return 1.0 if ramp_s <= 0 else min(1.0, since / ramp_s)


def caption(people: float, place: str) -> str:
    """What a smart camera's captioning model would say about `people` in view at `place`."""
    n = round(people)
    if n < 3:
        return f"an almost empty pavement near {place}"
    if n < 30:
        return f"a few pedestrians ({n}) walking near {place}"
    if n < 100:
        return f"a busy pavement with about {n} people near {place}"
    return f"a crowd of ~{round(n, -1)} people gathering near {place}"


class Simulator:
    """Samples the streams of one simulated device: a seeded RNG and AR(1) noise per stream."""

    def __init__(self, streams: list[Stream], *, seed: int) -> None:
        self.streams = streams
        self._rng = random.Random(seed)
        self._noise = {s.name: self._rng.gauss(0.0, s.noise) for s in streams}
        self._last: dict[str, float] = {}
        self.place = self._rng.choice(_PLACES)

    def due(self, stream: Stream, t: float) -> bool:
        """Whether `stream` is sampled at `t` (slow streams skip ticks)."""
        last = self._last.get(stream.name)
        return last is None or t - last >= stream.min_period_s

    def sample(
        self, stream: Stream, t: float, event: str | None, intensity: float
    ) -> tuple[float, str | None]:
        """(value, caption or None) of `stream` at `t`."""
        self._last[stream.name] = t
        shock = self._rng.gauss(0.0, stream.noise * math.sqrt(1 - _NOISE_MEMORY**2))
        self._noise[stream.name] = _NOISE_MEMORY * self._noise[stream.name] + shock
        value = clip(stream, expected(stream, t, event, intensity) + self._noise[stream.name])
        return value, caption(value, self.place) if stream.captions else None
