"""The gateway's settings: EDGECOLLAB_GATEWAY_* or --kebab-case flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from schemas.ids import AGENT_ID_PATTERN
from services.core.settings import RuntimeSettings, service_settings
from services.gateway.keys import check_keys, ensure_key_file, read_key_file


class GatewaySettings(BaseSettings):
    """Gateway settings: EDGECOLLAB_GATEWAY_* or --kebab-case flags."""

    model_config = service_settings("gateway")

    agent_id: str = Field("gateway-1", pattern=AGENT_ID_PATTERN)
    host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    port: int = Field(8080, ge=0, le=65535)
    api_keys: dict[str, str] = Field(
        {}, description='{"KEY": "tenant", ...}; with none, the key file is used'
    )
    api_key_file: Path | None = Field(
        None,
        description="lines of 'KEY [TENANT]'; default $EDGECOLLAB_STATE_DIR/gateway.key, "
        "made (mode 0600) with a new key for tenant 'default' when missing",
    )
    timeout_s: float = Field(60.0, gt=0, description="a request's deadline (the body may ask less)")
    max_tokens: int = Field(128, ge=1, le=4096, description="when a request sets none")
    recent: int = Field(50, ge=1, le=1000, description="queries the dashboard remembers")

    @property
    def key_file(self) -> Path | None:
        """The key file in use: the one given, else the default one unless keys are given."""
        if self.api_key_file is None and self.api_keys:
            return None
        return self.api_key_file or RuntimeSettings().state_dir / "gateway.key"

    def keys(self) -> dict[str, str]:
        """{key: tenant}: --api-keys and the key file (made with a new key when missing)."""
        keys = check_keys(dict(self.api_keys), "--api-keys")
        if self.key_file is not None:
            ensure_key_file(self.key_file)
            keys |= read_key_file(self.key_file)
        return keys

    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"
