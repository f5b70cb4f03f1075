"""An agent's presence in the CMS: retained card and status, epoch, and Last Will.

Versions of an agent's own entries are `epoch * EPOCH_SPAN + sequence`, so any entry of a
later start supersedes every entry of an earlier one, and the Last Will (the last sequence
number of its epoch) supersedes every status of its own epoch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from pydantic import ValidationError

from schemas import AgentCard, AgentStatus, CmsEntry, now
from services.core.bus import Bus
from services.core.connection import Connection
from services.core.errors import BadInput
from services.core.logging import EXCEPTIONS
from services.core.settings import MqttSettings
from services.core.topics import AGENT_CARD, AGENT_STATUS, REPLIES, Address
from services.core.wire import parse_payload

log = structlog.get_logger("edgecollab.presence")

EPOCH_SPAN = 1_000_000


async def next_epoch(settings: MqttSettings, agent: str) -> int:
    """One more than the epoch of the agent's retained card (1 when there is none).

    Read over a short connection of its own before the service connects, because the Last
    Will, fixed at connect time, must carry the new epoch.
    """
    topic, fence = AGENT_CARD.format(agent=agent), REPLIES.format(client=agent)
    epochs = [0]
    fenced = asyncio.get_running_loop().create_future()

    def collect(arrived: str, payload: bytes, _props: object) -> None:
        if arrived == fence and not fenced.done():
            fenced.set_result(None)
        elif arrived == topic:
            epochs.append(_epoch_of(payload))

    async with Connection(settings, client_id=agent, on_message=collect) as connection:
        await connection.subscribe([(topic, 1), (fence, 1)])
        connection.publish(fence, b"fence", qos=1, retain=False, props=None)
        async with asyncio.timeout(10):
            await fenced  # retained messages of earlier SUBSCRIBEs arrive before the fence
    return epochs[-1] + 1


def _epoch_of(payload: object) -> int:
    if not isinstance(payload, bytes) or not payload:
        return 0
    try:
        return AgentCard.model_validate(parse_payload(CmsEntry, payload, 1 << 20).value).epoch
    except (BadInput, ValidationError):
        return 0


def card_entry(card: AgentCard) -> CmsEntry:
    """The retained CMS entry of a card: the first version of its epoch."""
    return _entry(card, card.agent, card.epoch * EPOCH_SPAN)


def _entry(value: AgentCard | AgentStatus, origin: str, version: int) -> CmsEntry:
    return CmsEntry(
        value=value.model_dump(mode="json"), version=version, updated_at=time.time(), origin=origin
    )


class Presence:
    """Publishes an agent's card at every (re)connect, and its status on change and heartbeat."""

    def __init__(
        self, card: AgentCard, *, heartbeat_s: float = 5.0, min_interval_s: float = 0.25
    ) -> None:
        self.card = card
        self.load: Callable[[], tuple[int, int, float]] = lambda: (
            0,
            0,
            0.0,
        )  # active, queued, tok/s
        self._heartbeat_s = heartbeat_s
        self._min_interval_s = min_interval_s
        self._sequence = 0
        self._changed = asyncio.Event()
        self.card_topic = AGENT_CARD.format(agent=card.agent)
        self.status_topic = AGENT_STATUS.format(agent=card.agent)

    @property
    def base_version(self) -> int:
        return self.card.epoch * EPOCH_SPAN

    def will(self) -> tuple[Address[CmsEntry], CmsEntry]:
        """The Last Will: this epoch's final status, offline."""
        status = AgentStatus(
            agent=self.card.agent, epoch=self.card.epoch, online=False, updated_at=now()
        )
        return self.status_topic, self._entry(status, EPOCH_SPAN - 1)

    def attach(self, bus: Bus) -> None:
        bus.on_connect(lambda: self.announce(bus))

    async def announce(self, bus: Bus) -> None:
        """The birth: card, then status."""
        await bus.publish(self.card_topic, card_entry(self.card))
        await self.publish_status(bus)

    def changed(self) -> None:
        """Load changed: a status goes out soon (coalesced)."""
        self._changed.set()

    async def run(self, bus: Bus) -> None:
        """Publish status on change (at most every min_interval_s) and every heartbeat_s."""
        while True:
            try:
                async with asyncio.timeout(self._heartbeat_s):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            if bus.connected.is_set():
                await self.publish_status(bus)
            await asyncio.sleep(self._min_interval_s)

    async def publish_status(self, bus: Bus, *, online: bool = True) -> None:
        active, queued, rate = self.load()
        status = AgentStatus(
            agent=self.card.agent,
            epoch=self.card.epoch,
            online=online,
            active=active,
            queued=queued,
            tokens_per_s=round(rate, 2),
            exceptions=EXCEPTIONS.count,
            updated_at=now(),
        )
        self._sequence = min(self._sequence + 1, EPOCH_SPAN - 2)
        await bus.publish(self.status_topic, self._entry(status, self._sequence))

    async def retire(self, bus: Bus) -> None:
        """A clean shutdown says what the Last Will would have said."""
        topic, will = self.will()
        await bus.publish(topic, will)

    def _entry(self, value: AgentStatus, sequence: int) -> CmsEntry:
        return _entry(value, self.card.agent, self.base_version + sequence)
