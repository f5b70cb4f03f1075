"""What the orchestrator takes live from cms/configs (services/core/configs.py has the keys).

The cloud fallback: `cms/configs/fallback_endpoint` and `.../fallback_model` over the
orchestrator's own settings (null endpoint: no cloud). The API key of the settings goes only to
the endpoint it was configured for (same scheme, host and port): a CMS write can point the
fallback elsewhere, not carry the secret there. Model versions: a worker whose card's
model.version is not `cms/configs/<model>/version` (when set) gets no new task.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from schemas import AgentCard
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.configs import LiveConfigs
from services.orchestrator.cloud import CloudClient, CloudSettings

READS = ("fallback_endpoint", "fallback_model", "version")
DEFAULT_TIMEOUT_S = 30.0


class OrchestratorConfigs:
    """The orchestrator's live configs: `on_cloud` gets a new cloud client (or None) when the
    fallback changed, `on_versions` runs after every accepted change."""

    def __init__(
        self,
        bus: Bus,
        view: CmsView,
        *,
        cloud: CloudSettings | None,
        on_cloud: Callable[[CloudClient | None], None],
        on_versions: Callable[[], None],
    ) -> None:
        self.base = cloud
        self.http = httpx.AsyncClient(timeout=cloud.timeout_s if cloud else DEFAULT_TIMEOUT_S)
        self._on_cloud, self._on_versions = on_cloud, on_versions
        self._settings = cloud
        self.live = LiveConfigs(bus, view, reads=READS, judge_all=True, on_change=self._changed)

    def cloud(self) -> CloudClient | None:
        """A client for the cloud the settings and the CMS say now (None: no cloud)."""
        settings = self.cloud_settings()
        return CloudClient(settings, client=self.http) if settings else None

    def cloud_settings(self) -> CloudSettings | None:
        base = self.base
        url = self.live.get("fallback_endpoint", default=base.base_url if base else None)
        if url is None:
            return None
        model = self.live.get("fallback_model", default=base.model if base else "gpt-4")
        if base is None:
            return CloudSettings(base_url=url, model=model)
        key = base.api_key if _origin(url) == _origin(base.base_url) else None
        return base.model_copy(update={"base_url": url, "model": model, "api_key": key})

    def admits(self, card: AgentCard) -> bool:
        """Whether tasks may go to this worker: its model's version is the configured one."""
        if card.model is None:
            return True
        wanted = self.live.get("version", card.model.name)
        return wanted is None or wanted == card.model.version

    async def aclose(self) -> None:
        await self.http.aclose()

    def _changed(self) -> None:
        settings = self.cloud_settings()
        if settings != self._settings:
            self._settings = settings
            self._on_cloud(self.cloud())
        self._on_versions()


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port
