"""Settings read once from the environment (pydantic-settings), one prefix per service."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    """What every process shares: EDGECOLLAB_MODELS_DIR, EDGECOLLAB_LOG_LEVEL, ...

    Read once at an entry point and passed down; library code never reads the environment.
    """

    model_config = SettingsConfigDict(env_prefix="EDGECOLLAB_", extra="ignore")

    models_dir: Path = Field(Path("models"), description="where model folder names resolve")
    log_level: str = Field("info", pattern="(?i)^(debug|info|warning|error|critical)$")
    state_dir: Path = Field(
        Path.home() / ".local/state/edgecollab",
        description="where `edgecollab up` keeps its broker, credentials and keys",
    )

    def model_dir(self, name_or_path: str | Path) -> Path:
        """A path as given when it exists or is absolute, else a name under `models_dir`."""
        path = Path(name_or_path)
        return path if path.is_absolute() or path.exists() else self.models_dir / path


class MqttSettings(BaseSettings):
    """How to reach the broker: EDGECOLLAB_MQTT_HOST, EDGECOLLAB_MQTT_PORT, ..."""

    model_config = SettingsConfigDict(env_prefix="EDGECOLLAB_MQTT_", extra="ignore")

    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    keepalive: int = Field(10, ge=2, description="seconds; a hung peer is seen after ~1.5x")
    # 0 by default: mosquitto keeps handing $share/... messages to a dead member's persistent
    # session in turn, so a crashed orchestrator would swallow every Nth query until expiry.
    session_expiry_s: int = Field(0, ge=0, description="broker keeps our session this long")
    max_payload: int = Field(256 * 1024, ge=1024, description="larger payloads are refused")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def service_settings(service: str) -> SettingsConfigDict:
    """Settings of `python -m services.<service>`: EDGECOLLAB_<SERVICE>_* or --kebab-case flags."""
    return SettingsConfigDict(
        env_prefix=f"EDGECOLLAB_{service.upper()}_",
        cli_parse_args=True,
        cli_kebab_case=True,
        cli_prog_name=f"python -m services.{service}",
        extra="ignore",
    )


def parse_broker(value: str) -> tuple[str, int]:
    """Split `host:port` (or `host`, port 1883) for the --broker option."""
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "1883")
    if not host or not port.isdigit():
        raise ValueError(f"--broker wants host:port, got {value!r}")
    return host, int(port)
