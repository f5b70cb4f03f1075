"""The registry of sensor streams and how a simulated device samples them.

A `Stream` is the contract for `data/<domain>/<stream>/<agent>`: its unit (and accepted
spellings), the physical bounds outside which a reading is refused, the typical range that
scales embedding features, and an alert threshold a summary names. The sampling model is
`base + amplitude * shape(hour of day) + effect[event] * intensity + AR(1) noise`, clipped to
the bounds: plausible values with a daily rhythm, and events (a fever, a pollution spike, a
crowd) that ramp in when triggered by a setting or on a schedule.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Shape = Literal["diurnal", "rush_hour", "awake", "flat"]
Event = Literal["fever", "pollution", "crowd"]

_NOISE_MEMORY = 0.9  # AR(1) coefficient: sensor noise drifts rather than jumping


@dataclass(frozen=True, slots=True)
class Alert:
    """A threshold a summary calls out by name (e.g. body temperature above 38.0 °C: fever)."""

    label: str
    above: float | None = None
    below: float | None = None

    def hit(self, value: float) -> bool:
        return (self.above is not None and value > self.above) or (
            self.below is not None and value < self.below
        )


@dataclass(frozen=True, slots=True)
class Stream:
    """One kind of data: what a reading of it must look like and how it is simulated."""

    domain: str
    name: str
    label: str
    unit: str
    bounds: tuple[float, float]  # physically possible: outside is refused
    typical: tuple[float, float]  # everyday range: scales embedding features
    base: float
    amplitude: float
    shape: Shape
    noise: float
    effects: Mapping[str, float] = field(default_factory=dict)
    alert: Alert | None = None
    aliases: tuple[str, ...] = ()
    digits: int = 1
    min_period_s: float = 0.0  # sampled at most this often (sleep hours change slowly)
    captions: bool = False  # readings also carry a text caption (smart camera)

    @property
    def key(self) -> tuple[str, str]:
        return self.domain, self.name

    def accepts_unit(self, unit: str) -> bool:
        return unit == self.unit or unit in self.aliases

    def in_bounds(self, value: float) -> bool:
        return self.bounds[0] <= value <= self.bounds[1]


_UG = ("ug/m3", "ug/m^3", "µg/m3")
# domain, name, label, unit, bounds, typical, base, amplitude, shape, noise (sigma), then keywords
STREAMS: dict[tuple[str, str], Stream] = {
    s.key: s
    for s in (
        Stream("health", "heart_rate", "heart rate", "bpm", (20, 250), (50, 100), 58, 20,
               "diurnal", 2.5, effects={"fever": 28}, alert=Alert("tachycardia", above=100),
               digits=0),
        Stream("health", "spo2", "SpO2", "%", (50, 100), (90, 100), 96.5, 1.0, "diurnal", 0.5,
               effects={"fever": -4.5}, alert=Alert("low oxygen saturation", below=92),
               digits=0),
        Stream("health", "respiration", "respiration", "breaths/min", (3, 70), (10, 22), 12, 4,
               "diurnal", 0.8, effects={"fever": 8}, alert=Alert("rapid breathing", above=20),
               digits=0),
        Stream("health", "activity", "activity", "steps/min", (0, 300), (0, 120), 0, 30,
               "awake", 12, effects={"fever": -25}, digits=0),
        Stream("health", "sleep", "sleep last night", "h", (0, 24), (4, 10), 7.2, 0, "flat",
               0.1, effects={"fever": -2.5}, alert=Alert("short sleep", below=6),
               min_period_s=60),
        Stream("health", "body_temp", "body temperature", "°C", (25, 45), (35.5, 38.5), 36.4,
               0.5, "diurnal", 0.08, effects={"fever": 2.2}, alert=Alert("fever", above=38.0),
               aliases=("degC", "C", "celsius")),
        Stream("environment", "pm25", "PM2.5", "µg/m³", (0, 1000), (0, 50), 6, 14,
               "rush_hour", 1.5, effects={"pollution": 70},
               alert=Alert("unhealthy air", above=35), aliases=_UG),
        Stream("environment", "no2", "NO2", "µg/m³", (0, 2000), (0, 100), 12, 38, "rush_hour",
               3, effects={"pollution": 150},
               alert=Alert("NO2 over the 1-hour limit", above=200), aliases=_UG, digits=0),
        Stream("environment", "noise", "noise", "dB(A)", (20, 140), (35, 80), 45, 22,
               "rush_hour", 2, effects={"crowd": 28}, alert=Alert("loud", above=70),
               aliases=("dBA",)),
        Stream("environment", "traffic", "traffic", "vehicles/min", (0, 500), (0, 60), 2, 40,
               "rush_hour", 3, effects={"crowd": 25, "pollution": 10},
               alert=Alert("congestion", above=55), aliases=("veh/min",), digits=0),
        Stream("environment", "camera", "people in view", "people", (0, 100_000), (0, 150), 2,
               25, "diurnal", 3, effects={"crowd": 190}, alert=Alert("crowd", above=100),
               digits=0, min_period_s=2, captions=True),
    )
}  # fmt: skip

PROFILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "wearable": ("health", ("heart_rate", "spo2", "respiration", "activity", "sleep", "body_temp")),
    "city": ("environment", ("pm25", "no2", "noise", "traffic", "camera")),
}
EVENT_DOMAINS: dict[str, str] = {
    "fever": "health",
    "pollution": "environment",
    "crowd": "environment",
}

_PLACES = ("the stadium gate", "the main square", "the central station", "the riverside park")


def lookup(domain: str, name: str) -> Stream | None:
    """The registered stream, or None for one the registry does not know."""
    return STREAMS.get((domain, name))


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
