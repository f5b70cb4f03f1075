"""`python -m services.replicator`: one site's CMS replicator."""

import asyncio
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings

from schemas import AgentCard, now
from schemas.ids import AGENT_ID_PATTERN
from services.core.bus import Bus
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import Loop, run_agent
from services.core.settings import MqttSettings, RuntimeSettings, service_settings
from services.replicator.rules import DEFAULT_RULES, Rule
from services.replicator.service import Replicator


class ReplicatorSettings(BaseSettings):
    """Replicator settings: EDGECOLLAB_REPLICATOR_* or --kebab-case flags."""

    model_config = service_settings("replicator")

    agent_id: str = Field("replicator-1", pattern=AGENT_ID_PATTERN)
    site: str = Field("site-1", pattern=AGENT_ID_PATTERN, description="this site, unique")
    peers: list[str] = Field(
        [], description='peer sites\' brokers, e.g. ["mqtts://site-b:8883"] (user:pass@ allowed)'
    )
    peer_password_file: Path | None = Field(
        None,
        description="the secret of account peer-<site> on the peers' brokers (default:"
        " <state dir>/security/secrets/peer-<site>, where `edgecollab up --site` makes it)",
    )
    peer_tls_ca: Path | None = Field(
        None, description="the CA the peers' brokers are verified by (mqtts://; default: ours)"
    )
    rules: list[Rule] = Field(list(DEFAULT_RULES), description="what replicates; first match")
    anti_entropy_s: float = Field(30.0, gt=0, description="digest comparison with each peer")
    tombstone_ttl_s: float = Field(7 * 86400.0, gt=0, description="how long deletes are kept")
    request_timeout_s: float = Field(2.0, gt=0, description="a digest or want unanswered")

    @field_validator("peers")
    @classmethod
    def _valid_peers(cls, peers: list[str]) -> list[str]:
        for url in peers:
            peer_settings(url, MqttSettings())
        return peers


def peer_settings(
    url: str,
    local: MqttSettings,
    *,
    account: str | None = None,
    password_file: Path | None = None,
    tls_ca: Path | None = None,
) -> MqttSettings:
    """A peer's broker from `mqtt[s]://[user[:password]@]host[:port]` (or `host[:port]`);
    `mqtts` is TLS (port 8883 unless given), verified by `tls_ca` (else the local broker's CA).
    The account is the URL's, else `account` with its secret in `password_file`; what the URL
    does not say (keepalive, limits) is as for the local broker."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"peer {url!r}: want mqtt://host[:port] or mqtts://host[:port]")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"peer {url!r}: bad port") from None
    update: dict[str, object] = {"host": parts.hostname, "port": port, "tls": tls}
    update |= {"tls_ca": (tls_ca or local.tls_ca) if tls else None, "tls_cert": None}
    if parts.username is not None:
        update["username"] = unquote(parts.username)
        update["password"] = SecretStr(unquote(parts.password)) if parts.password else None
        update["password_file"] = None
    elif account is not None:
        update |= {"username": account, "password": None, "password_file": password_file}
    return local.model_copy(update=update)


def peer_login(
    settings: ReplicatorSettings, state_dir: Path
) -> tuple[str, Path | None, Path | None]:
    """The account this site's links log in as (peer-<site>), its secret file and the CA of
    the peers' brokers: as configured, else what `edgecollab up --site` made in the state dir."""
    security = state_dir / "security"
    account = f"peer-{settings.site}"
    secret = settings.peer_password_file or _existing(security / "secrets" / account)
    return account, secret, settings.peer_tls_ca or _existing(security / "tls" / "ca.crt")


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


async def serve(
    settings: ReplicatorSettings, mqtt: MqttSettings, state_dir: Path | None = None
) -> None:
    account, secret, ca = peer_login(settings, state_dir or RuntimeSettings().state_dir)

    def card(epoch: int) -> AgentCard:
        return AgentCard(agent=settings.agent_id, kind="replicator", epoch=epoch, started_at=now())

    def setup(bus: Bus, presence: Presence) -> list[Loop]:
        replicator = Replicator(
            bus,
            site=settings.site,
            peers=[
                peer_settings(url, mqtt, account=account, password_file=secret, tls_ca=ca)
                for url in settings.peers
            ],
            rules=settings.rules,
            anti_entropy_s=settings.anti_entropy_s,
            tombstone_ttl_s=settings.tombstone_ttl_s,
            request_timeout_s=settings.request_timeout_s,
        )
        return replicator.loops()

    await run_agent(mqtt, agent=settings.agent_id, service="replicator", card=card, setup=setup)


def main() -> None:
    settings = ReplicatorSettings()
    configure_logging("replicator")
    asyncio.run(serve(settings, MqttSettings()))


if __name__ == "__main__":
    main()
