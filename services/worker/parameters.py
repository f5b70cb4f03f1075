"""Dynamic decoding parameters from the CMS (`cms/parameters/<model>/<name>`), applied live.

A request's own sampling options win over the CMS values, which win over the model's defaults
(`MODEL_DEFAULTS`, measured; greedy decoding). A key with an unknown name or a value of the
wrong type is refused with an Error on errors/<service>.

At start a worker publishes its model's defaults under `cms/parameters/<model>/...`, so that
they are seen where they are changed (`edgecollab cms get parameters/`). It writes a key only
when it is absent or was written by a worker (an earlier default): a value an operator set stays.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas import CmsEntry, SamplingOptions
from services.core import cms
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import PARAMETER

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
        """The model's defaults under cms/parameters/<model>/..., where no operator set one."""
        await self._view.synced()
        for name, value in self._defaults.items():
            if name == "stop":
                continue
            key = PARAMETER.format(model=self._model, name=name)
            current = self._view.get(key)
            if current is not None and (current.value == value or not self._by_worker(current)):
                continue
            version = current.version + 1 if current else 1
            await cms.put(self._bus, key, value, version=version)

    def _by_worker(self, entry: CmsEntry) -> bool:
        card = self._view.cards.get(entry.origin)
        return entry.origin == self._bus.client_id or (card is not None and card.kind == "worker")

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
        self.values[name] = value
