"""Running a service process: signals, the bus and its loops under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import structlog

from schemas import AgentCard
from services.core.bus import Bus
from services.core.presence import Presence, next_epoch
from services.core.retry import until_reachable
from services.core.settings import MqttSettings

log = structlog.get_logger("edgecollab.service")

Loop = Callable[[], Coroutine[Any, Any, None]]


async def run_agent(
    mqtt: MqttSettings,
    *,
    agent: str,
    service: str,
    card: Callable[[int], AgentCard],
    setup: Callable[[Bus, Presence], Iterable[Loop] | None],
) -> None:
    """The life of an agent: next epoch, card, Last Will, `setup(bus, presence)`, run.

    `setup` wires the service onto the bus and returns its background loops, if any.
    """
    if mqtt.username is not None and mqtt.username != agent:  # the broker's client id
        raise SystemExit(
            f"{service}: the account {mqtt.username!r} is not the agent id {agent!r} (the"
            " broker takes the username as the client id: EDGECOLLAB_MQTT_USERNAME = agent id)"
        )
    # Statuses twice per keepalive: a peer silent for a whole keepalive is frozen or cut off
    # (Dispatcher.watch_silence), before the broker's 1.5x keepalive fires the Last Will.
    epoch = await _next_epoch_when_reachable(mqtt, agent)
    presence = Presence(card(epoch), heartbeat_s=mqtt.keepalive / 2)
    bus = Bus(settings=mqtt, client_id=agent, service=service, will=presence.will())
    loops = setup(bus, presence) or ()
    await run_until_stopped(bus, *loops, presence=presence)


async def _next_epoch_when_reachable(mqtt: MqttSettings, agent: str) -> int:
    """`next_epoch`, waiting for the broker as the bus does (e.g. compose starts us first)."""
    async for attempt in until_reachable("broker.unreachable", first_s=0.5, broker=mqtt.address):
        with attempt:
            return await next_epoch(mqtt, agent)
    raise AssertionError("unreachable: the retrying never stops")


async def run_until_stopped(
    bus: Bus,
    *loops: Loop,
    presence: Presence | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run the bus and `loops` until SIGTERM/SIGINT, then say goodbye and stop them."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(bus.run())]
        if presence is not None:
            presence.attach(bus)
            tasks.append(group.create_task(presence.run(bus)))
        tasks += [group.create_task(make_loop()) for make_loop in loops]
        await stop.wait()
        log.info("service.stopping")
        await _goodbye(bus, presence, on_stop)
        for task in tasks:
            task.cancel()


async def _goodbye(
    bus: Bus, presence: Presence | None, on_stop: Callable[[], Awaitable[None]] | None
) -> None:
    """Best effort within a second: finish up and say offline rather than wait for the will."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            if on_stop is not None:
                await on_stop()
            if presence is not None and bus.connected.is_set():
                await presence.retire(bus)
