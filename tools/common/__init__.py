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
from pathlib import Path

import orjson
from pydantic import ValidationError

from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.logging import configure_logging
from services.core.ownership import Accounts
from services.core.settings import MqttSettings, RuntimeSettings, parse_broker
from tools import ROOT
from tools.common.broker import broker_answers
from tools.common.credentials import Credentials


def add_broker_option(parser: argparse.ArgumentParser) -> None:
    """--broker and the account and TLS options (each also an EDGECOLLAB_MQTT_* variable)."""
    parser.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="MQTT broker (default: EDGECOLLAB_MQTT_HOST:PORT, else localhost:1883)",
    )
    group = parser.add_argument_group(
        "account and TLS (default on the stack's box: an operator account of EDGECOLLAB_STATE_DIR)"
    )
    group.add_argument("--username", help="the account (= the client id)")
    group.add_argument("--password-file", type=Path, metavar="FILE", help="its secret")
    group.add_argument("--tls", action="store_true", help="TLS (the CA: --tls-ca, else ours)")
    group.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA to verify the broker by")
    group.add_argument("--tls-cert", type=Path, metavar="FILE", help="a client certificate")
    group.add_argument("--tls-key", type=Path, metavar="FILE", help="its key")


def mqtt_settings(args: argparse.Namespace, *, account: bool = True) -> MqttSettings:
    """The broker and account a command uses: its options, else EDGECOLLAB_MQTT_*, else (on
    the box where `edgecollab up` or tools/setup.sh made accounts) a free operator account;
    `account=False`: only the broker's address and TLS."""
    settings = MqttSettings()
    update: dict[str, object] = {}
    if getattr(args, "broker", None):
        try:
            host, port = parse_broker(args.broker)
            MqttSettings(host=host, port=port)  # its bounds checked
        except ValidationError as exc:
            reason = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise SystemExit(f"edgecollab: --broker {args.broker!r}: {reason}") from None
        except ValueError as exc:
            raise SystemExit(f"edgecollab: {exc}") from None
        update["host"], update["port"] = host, port
    for option in ("username", "password_file", "tls_ca", "tls_cert", "tls_key"):
        if getattr(args, option, None) is not None:
            update[option] = getattr(args, option)
    if getattr(args, "tls", False):
        update["tls"] = True
    settings = settings.model_copy(update=update)
    local = Credentials.of_state_dir(RuntimeSettings().state_dir)
    if settings.uses_tls and settings.tls_ca is None and local.ca.exists():
        settings = settings.model_copy(update={"tls_ca": local.ca})
    if account and settings.username is None and settings.tls_cert is None:
        seat = local.operator_seat()
        if seat is not None:
            settings = local.settings(seat, settings)
    try:
        settings.secret()
    except ValueError as exc:
        raise SystemExit(f"edgecollab: {exc}") from None
    return settings


_CONNECTION = ("host", "port", "username", "password", "password_file", "tls", "tls_ca")
_CONNECTION += ("tls_cert", "tls_key", "keepalive")


def child_env(mqtt: MqttSettings, **extra: str) -> dict[str, str]:
    """This process's environment for a child, with EDGECOLLAB_MQTT_* saying where the broker
    is, the account and TLS (none of ours inherited). A secret goes by its file's path, never
    as a value: the environment shows in `ps e`."""
    if mqtt.password is not None:
        raise ValueError("a child process gets its secret as a file (password_file)")
    names = {f"EDGECOLLAB_MQTT_{name.upper()}": name for name in _CONNECTION}
    env = {key: value for key, value in os.environ.items() if key not in names}
    for key, name in names.items():
        value = getattr(mqtt, name)
        if value is not None and value is not False:
            env[key] = "true" if value is True else str(value)
    return {**env, **extra}


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
    client_id = settings.username or f"cli-{uuid.uuid4().hex[:10]}"  # the broker's client id
    bus = Bus(settings=settings, client_id=client_id, service="cli")
    accounts = Accounts.of_state_dir(RuntimeSettings().state_dir)  # judged as services judge
    # a read-only snapshot: no acks needed
    view = CmsView(bus, qos=0, accounts=accounts) if mirror_cms else None
    if setup is not None:
        setup(bus)
    async with running(bus):
        try:
            async with asyncio.timeout(5):
                await bus.connected.wait()
        except TimeoutError:
            if not broker_answers(settings.host, settings.port):
                raise SystemExit(
                    f"edgecollab: no MQTT broker answers at {settings.address}"
                ) from None
            who = f"account {settings.username!r}" if settings.username else "anonymous clients"
            transport = "TLS" if settings.uses_tls else "plain MQTT"
            raise SystemExit(
                f"edgecollab: the broker at {settings.address} refused {who} over {transport}"
                " (see the warnings above; --username, --password-file, --tls, README Security)"
            ) from None
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


def spawn(
    argv: list[str], mqtt: MqttSettings, *, state_dir: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a process of this checkout against `mqtt` (benchmarks), with the accounts of
    `state_dir` (a private broker's); its stdout is dropped."""
    extra = {"EDGECOLLAB_STATE_DIR": str(state_dir)} if state_dir is not None else {}
    env = child_env(mqtt, EDGECOLLAB_LOG_LEVEL="warning", **extra)
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
