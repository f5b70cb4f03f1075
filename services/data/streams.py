"""The registry of data streams: what a reading must look like, and how a device simulates it.

A `Stream` is the contract for `data/<domain>/<stream>/<agent>`: its unit (and accepted
spellings), the physical bounds outside which a reading is refused, the typical range that
scales embedding features, and an alert threshold a summary names. The sampling model is
`base + amplitude * shape(hour of day) + effect[event] * intensity + AR(1) noise`, clipped to
the bounds: plausible values with a daily rhythm, and events (a fever, a pollution spike, a
crowd) that ramp in when triggered by a setting or on a schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Shape = Literal["diurnal", "rush_hour", "awake", "flat"]
Event = Literal["fever", "pollution", "crowd"]


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


def lookup(domain: str, name: str) -> Stream | None:
    """The registered stream, or None for one the registry does not know."""
    return STREAMS.get((domain, name))
