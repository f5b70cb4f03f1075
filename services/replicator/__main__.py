"""`python -m services.replicator`: one site's CMS replicator."""

import asyncio
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings

from schemas import AgentCard, now
from schemas.ids import AGENT_ID_PATTERN
from services.core.bus import Bus
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import Loop, run_agent
from services.core.settings import MqttSettings, service_settings
from services.replicator.rules import DEFAULT_RULES, Rule
from services.replicator.service import Replicator


class ReplicatorSettings(BaseSettings):
    """Replicator settings: EDGECOLLAB_REPLICATOR_* or --kebab-case flags."""

    model_config = service_settings("replicator")

    agent_id: str = Field("replicator-1", pattern=AGENT_ID_PATTERN)
    site: str = Field("site-1", pattern=AGENT_ID_PATTERN, description="this site, unique")
    peers: list[str] = Field(
        [], description='peer sites\' brokers, e.g. ["mqtt://site-b:1883"] (user:pass@ allowed)'
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


def peer_settings(url: str, local: MqttSettings) -> MqttSettings:
    """A peer's broker from `mqtt://[user[:password]@]host[:port]` (or `host[:port]`); what
    the URL does not say (keepalive, limits, and later TLS) is as for the local broker."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError(f"peer {url!r}: want mqtt://host[:port]")
    try:
        port = parts.port or 1883
    except ValueError:
        raise ValueError(f"peer {url!r}: bad port") from None
    update: dict[str, object] = {"host": parts.hostname, "port": port}
    if parts.username is not None:
        update["username"] = unquote(parts.username)
        update["password"] = SecretStr(unquote(parts.password)) if parts.password else None
    return local.model_copy(update=update)


async def serve(settings: ReplicatorSettings, mqtt: MqttSettings) -> None:
    def card(epoch: int) -> AgentCard:
        return AgentCard(agent=settings.agent_id, kind="replicator", epoch=epoch, started_at=now())

    def setup(bus: Bus, presence: Presence) -> list[Loop]:
        replicator = Replicator(
            bus,
            site=settings.site,
            peers=[peer_settings(url, mqtt) for url in settings.peers],
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
