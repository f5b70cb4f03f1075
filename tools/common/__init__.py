"""What the CLI commands share: the --broker option and a short-lived bus."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
from pydantic import ValidationError

from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.logging import configure_logging
from services.core.settings import MqttSettings, parse_broker
from tools import ROOT


def add_broker_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="MQTT broker (default: EDGECOLLAB_MQTT_HOST:PORT, else localhost:1883)",
    )


def mqtt_settings(args: argparse.Namespace) -> MqttSettings:
    if not getattr(args, "broker", None):
        return MqttSettings()
    try:
        host, port = parse_broker(args.broker)
        return MqttSettings(host=host, port=port)
    except ValidationError as exc:
        reason = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"edgecollab: --broker {args.broker!r}: {reason}") from None
    except ValueError as exc:
        raise SystemExit(f"edgecollab: {exc}") from None


@asynccontextmanager
async def connected_bus(
    args: argparse.Namespace,
    *,
    mirror_cms: bool = False,
    setup: Callable[[Bus], object] | None = None,
) -> AsyncIterator[tuple[Bus, CmsView | None]]:
    """A CLI client on the bus for a block; with `mirror_cms` its CmsView is synced first
    (and whatever `setup` attached to the bus before it connected, e.g. a DataView).

    Fails fast with a clear message when no broker answers.
    """
    configure_logging("cli", level="error")  # a broker that does not answer: one line below
    settings = mqtt_settings(args)
    bus = Bus(settings=settings, client_id=f"cli-{uuid.uuid4().hex[:10]}", service="cli")
    view = CmsView(bus, qos=0) if mirror_cms else None  # a read-only snapshot: no acks needed
    if setup is not None:
        setup(bus)
    async with running(bus):
        try:
            async with asyncio.timeout(5):
                await bus.connected.wait()
        except TimeoutError:
            raise SystemExit(f"edgecollab: no MQTT broker answers at {settings.address}") from None
        if view is not None:
            await view.synced()
        yield bus, view


@asynccontextmanager
async def running(bus: Bus) -> AsyncIterator[Bus]:
    """Run `bus` for the block (attach its views and handlers first), then stop it."""
    task = asyncio.create_task(bus.run())
    try:
        yield bus
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def spawn(argv: list[str], mqtt: MqttSettings) -> subprocess.Popen[bytes]:
    """Start a process of this checkout against `mqtt` (benchmarks); its stdout is dropped."""
    env = {
        **os.environ,
        "EDGECOLLAB_MQTT_HOST": mqtt.host,
        "EDGECOLLAB_MQTT_PORT": str(mqtt.port),
        "EDGECOLLAB_MQTT_KEEPALIVE": str(mqtt.keepalive),
        "EDGECOLLAB_LOG_LEVEL": "warning",
    }
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def stop(*procs: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM every process, then wait for each (killing one that hangs), so that services
    leave before the broker they talk to does."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"pid {proc.pid} ignored SIGTERM for {timeout:.0f} s; killed", file=sys.stderr)
            proc.kill()
            proc.wait()


def print_json(value: object) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
