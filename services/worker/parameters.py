"""Dynamic decoding parameters from the CMS (`cms/parameters/<model>/<name>`), applied live.

A request's own sampling options win over the CMS values, which win over the model's defaults
(`MODEL_DEFAULTS`, measured; greedy decoding). A key with an unknown name, a value of the wrong
type, or a value outside the live bounds is refused with an Error on errors/<service>.

The live bounds are tighter than a request's own: a CMS value changes every answer of the
model, so it must stay where answers stay sane. Measured on SmolLM2-135M-Instruct ("What is
the capital of France?", greedy unless said): temperature 0.7 still answers, 1.0 drifts into
another language, 1.3, 1.6, 2 and 5 give word salad; a repetition penalty of 1.3 still
answers, 1.5 and above garble it, below 1 makes the model repeat itself.

At start a worker publishes its model's defaults under `cms/slm/<model>/defaults` (a model
detail, which workers write), so that they are seen beside the parameters that change them;
`cms/parameters/` is the operators' alone (README Security).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from schemas import CmsEntry, SamplingOptions
from services.core import cms
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import MODEL_DETAIL, PARAMETER

KNOWN = tuple(name for name in SamplingOptions.model_fields if name != "stop")


# A model not measured: small models repeat themselves after a few dozen tokens without one.
DEFAULTS = SamplingOptions(repetition_penalty=1.15)
# Measured per model on the quality set (`edgecollab bench sampling`, docs/results/sampling-*.json):
# any repetition penalty costs facts and code, temperature costs or gains nothing, so greedy
# decoding without a penalty for both.
MODEL_DEFAULTS: dict[str, SamplingOptions] = {
    "SmolLM2-135M-Instruct": SamplingOptions(temperature=0.0, repetition_penalty=1.0),
    "Qwen2.5-Coder-0.5B-Instruct": SamplingOptions(temperature=0.0, repetition_penalty=1.0),
}
# What a CMS value may be (inclusive); a request's own options keep the wire's bounds.
LIVE_BOUNDS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 1.0),
    "repetition_penalty": (1.0, 1.3),
}


class LiveParameters:
    """The current CMS parameters of one model, kept in step with the CMS view."""

    def __init__(
        self, bus: Bus, view: CmsView, *, model: str, defaults: SamplingOptions | None = None
    ) -> None:
        self._bus = bus
        self._view = view
        self._model = model
        chosen = defaults or MODEL_DEFAULTS.get(model, DEFAULTS)
        self._defaults = chosen.model_dump(exclude_none=True, exclude_defaults=True)
        self.values: dict[str, Any] = {}
        view.on_change(self._on_change)

    async def publish_defaults(self) -> None:
        """The model's defaults, as this worker applies them, under cms/slm/<model>/defaults."""
        await self._view.synced()
        key = MODEL_DETAIL.format(model=self._model, field="defaults")
        current = self._view.get(key)
        value = {k: v for k, v in self._defaults.items() if k != "stop"}
        await cms.put(self._bus, key, value, version=current.version + 1 if current else 1)

    def resolve(self, requested: SamplingOptions) -> SamplingOptions:
        """The request's options, then the CMS values, then the worker's defaults."""
        asked = requested.model_dump(exclude_unset=True, exclude_none=True)
        return SamplingOptions.model_validate({**self._defaults, **self.values, **asked})

    def _on_change(self, key: str, entry: CmsEntry | None) -> None:
        params = PARAMETER.match(key)
        if params is None or params["model"] != self._model:
            return
        name = params["name"]
        if entry is None:
            self.values.pop(name, None)
        elif name not in KNOWN:
            self._bus.report("bad_request", f"unknown parameter {name!r}; known: {KNOWN}", key)
        else:
            self._accept(key, name, entry.value)

    def _accept(self, key: str, name: str, value: Any) -> None:
        try:
            SamplingOptions.model_validate({name: value})
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            self._bus.report("bad_request", f"parameter {name}={value!r}: {message}", key)
            return
        low, high = LIVE_BOUNDS.get(name, (-math.inf, math.inf))
        if isinstance(value, int | float) and not low <= value <= high:
            bounds = f"live values of {name} stay within {low}-{high}"
            self._bus.report("bad_request", f"parameter {name}={value!r} refused: {bounds}", key)
            self.values.pop(name, None)  # not the value before it either: that was replaced
            return
        self.values[name] = value
