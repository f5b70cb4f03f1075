"""Deployment configuration from the CMS (`cms/configs/...`), read live: the key table and a view.

Each key has one type with bounds; a service applies the keys it reads on the next request
after they change, with no restart. A value of the wrong type or out of bounds, an unknown key
and a model level that names no model (`*`, `all`: there are no wildcards) are refused with an
Error on errors/<service>, and the value before it stays in force; deleting a key goes back to
the service's own setting.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, HttpUrl, StrictInt, StringConstraints, TypeAdapter, ValidationError

from schemas import CmsEntry
from schemas.ids import MODEL_NAME_PATTERN, VERSION_PATTERN
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import MODEL_CONFIG, SITE_CONFIG

MAX_TOKENS_LIMIT = 4096  # a Task's own bound (schemas.Task.max_tokens)


@dataclass(frozen=True)
class ConfigKey:
    """One configuration key: `cms/configs/<name>` (a site's) or `cms/configs/<model>/<name>`."""

    name: str
    per_model: bool
    adapter: TypeAdapter[Any]
    kind: str  # the type and bounds, as the README's table says them
    read_by: str
    meaning: str


def _key(
    name: str, per_model: bool, type_: Any, kind: str, read_by: str, meaning: str
) -> ConfigKey:
    return ConfigKey(name, per_model, TypeAdapter(type_), kind, read_by, meaning)


KEYS: dict[str, ConfigKey] = {
    key.name: key
    for key in (
        _key(
            "fallback_endpoint", False,
            HttpUrl | None,
            "http(s) URL (at most 2083 characters) or null", "orchestrator",
            "the cloud's OpenAI-compatible base URL (…/v1); null: no cloud",
        ),
        _key(
            "fallback_model", False,
            Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)],
            "string, 1-128 of [A-Za-z0-9._-]", "orchestrator",
            "the model asked for at the cloud",
        ),
        _key(
            "max_tokens", True,
            Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)],
            f"integer 1-{MAX_TOKENS_LIMIT}", "worker",
            "the most tokens a worker of the model writes per request",
        ),
        _key(
            "version", True,
            Annotated[str, StringConstraints(pattern=VERSION_PATTERN)],
            "string, 1-64 of [A-Za-z0-9._+-]", "orchestrator",
            "tasks go only to the model's workers of this version (their card's model.version)",
        ),
    )
}  # fmt: skip
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_UNSET = object()
_SHAPE = "a config key is cms/configs/<name> or cms/configs/<model>/<name>"


class LiveConfigs:
    """The valid values of the keys `reads` names, kept in step with a CMS view.

    `model` set: only that model's per-model keys are read (a worker). `judge_all`: every
    `cms/configs/...` key is judged and refused ones reported, read or not (the orchestrator).
    `on_change` runs after each accepted change.
    """

    def __init__(
        self,
        bus: Bus,
        view: CmsView,
        *,
        reads: Collection[str],
        model: str | None = None,
        judge_all: bool = False,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        unknown = set(reads) - set(KEYS)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        self._bus, self._reads, self._model, self._judge_all = bus, set(reads), model, judge_all
        self._on_change = on_change
        self.values: dict[tuple[str | None, str], Any] = {}  # (model or None, name) -> value
        view.on_change(self._changed)

    def get(self, name: str, model: str | None = None, default: Any = None) -> Any:
        """The value in force; `default` (the service's own setting) when the key is not set."""
        return self.values.get((model, name), default)

    def _changed(self, key: str, entry: CmsEntry | None) -> None:
        params = MODEL_CONFIG.match(key) or SITE_CONFIG.match(key)
        if params is None:
            if key.startswith("cms/configs/") and self._judge_all and entry is not None:
                self._refuse(key, _SHAPE)
            return
        model, name = params.get("model"), params["name"]
        if self._model is not None and model not in (None, self._model):
            return
        mine = name in self._reads and (self._model is None or model is not None)
        if entry is None:
            if self.values.pop((model, name), _UNSET) is not _UNSET:
                self._notify()
            return
        if not (mine or self._judge_all):
            return
        problem = _problem(model, name, entry.value)
        if problem is not None:
            self._refuse(key, problem)
        elif mine:
            self.values[(model, name)] = _plain(KEYS[name].adapter.validate_python(entry.value))
            self._notify()

    def _refuse(self, key: str, problem: str) -> None:
        kept = self.values.get(_levels(key), _UNSET)
        suffix = "" if kept is _UNSET else f"; keeping {kept!r}"
        self._bus.report("bad_request", f"{key}: {problem}{suffix}", key)

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()


def problem(key: str, value: Any) -> str | None:
    """Why services would refuse `value` at `key` (a cms/configs/... key); None: they take it."""
    params = MODEL_CONFIG.match(key) or SITE_CONFIG.match(key)
    return _SHAPE if params is None else _problem(params.get("model"), params["name"], value)


def _problem(model: str | None, name: str, value: Any) -> str | None:
    """Why `value` is no valid config `name` (of `model`), None when it is."""
    spec = KEYS.get(name)
    if spec is None or spec.per_model != (model is not None):
        known = ", ".join(f"<model>/{k}" if s.per_model else k for k, s in KEYS.items())
        return f"unknown config key; known: {known}"
    if model is not None and not _MODEL_NAME.match(model):
        return f"{model!r} is not a model name (no wildcards: name one model)"
    try:
        spec.adapter.validate_python(value)
    except ValidationError as exc:
        return f"{value!r} is not a valid {name} ({spec.kind}): {exc.errors()[0]['msg']}"
    return None


def _plain(value: Any) -> Any:
    """A URL as the string it was given in; other values as they are."""
    return str(value) if isinstance(value, HttpUrl) else value


def _levels(key: str) -> tuple[str | None, str]:
    params = MODEL_CONFIG.match(key) or SITE_CONFIG.match(key) or {"name": key}
    return params.get("model"), params["name"]
