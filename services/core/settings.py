"""Settings read once from the environment (pydantic-settings), one prefix per service."""

from __future__ import annotations

import ssl
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
    """How to reach the broker: EDGECOLLAB_MQTT_HOST, EDGECOLLAB_MQTT_PORT, ...

    Credentials: a username (= the MQTT client id: the broker enforces it) and its secret, best
    from a file (`password_file`, read at each connect) so that it never shows in `ps` or a log.
    TLS is on when `tls` is set or a CA is given; a client certificate is optional (the
    broker's certificate listener takes its common name as the username).
    """

    model_config = SettingsConfigDict(env_prefix="EDGECOLLAB_MQTT_", extra="ignore")

    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="a file holding the password")
    tls: bool = Field(False, description="TLS with the system's CAs (or tls_ca)")
    tls_ca: Path | None = Field(None, description="CA certificate(s) to verify the broker by")
    tls_cert: Path | None = Field(None, description="client certificate (PEM), optional")
    tls_key: Path | None = Field(None, description="its private key (PEM)")
    keepalive: int = Field(10, ge=2, description="seconds; a hung peer is seen after ~1.5x")
    # 0 by default: mosquitto keeps handing $share/... messages to a dead member's persistent
    # session in turn, so a crashed orchestrator would swallow every Nth query until expiry.
    session_expiry_s: int = Field(0, ge=0, description="broker keeps our session this long")
    max_payload: int = Field(256 * 1024, ge=1024, description="larger payloads are refused")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def secret(self) -> str | None:
        """The password: `password`, else the first line of `password_file` (read now)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is empty"
            message = f"cannot read the password file {self.password_file}: {reason}"
            raise ValueError(message) from None

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS client context (None without TLS): verifies the broker's certificate and
        host name, TLS 1.2 at least, and presents the client certificate when one is set."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


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
