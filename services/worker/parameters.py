"""Dynamic decoding parameters from the CMS (`cms/parameters/<model>/<name>`), applied live.

A request's own sampling options win over the CMS values, which win over the worker's defaults
(a repetition penalty of 1.15; greedy decoding). A key
with an unknown name or a value of the wrong type is refused with an Error on errors/<service>.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas import CmsEntry, SamplingOptions
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import PARAMETER

KNOWN = tuple(name for name in SamplingOptions.model_fields if name != "stop")


# Small models repeat themselves after a few dozen tokens without a repetition penalty.
DEFAULTS = SamplingOptions(repetition_penalty=1.15)


class LiveParameters:
    """The current CMS parameters of one model, kept in step with the CMS view."""

    def __init__(
        self, bus: Bus, view: CmsView, *, model: str, defaults: SamplingOptions = DEFAULTS
    ) -> None:
        self._bus = bus
        self._model = model
        self._defaults = defaults.model_dump(exclude_none=True, exclude_defaults=True)
        self.values: dict[str, Any] = {}
        view.on_change(self._on_change)

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
