"""Test session fixtures: one real mosquitto, clean CMS per test via unique agent ids."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
import structlog

from services.core.bus import Bus
from services.core.logging import EXCEPTIONS
from services.core.settings import MqttSettings
from tests.broker import ROOT, Broker
from tools.common import child_env

pytest_plugins = ["tests.classifier_fixtures", "tests.model_fixtures"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "logged_exceptions(n): the test provokes n logged exceptions on purpose"
    )
    # Count exceptions in this process whatever else configures structlog later.
    processors = structlog.get_config()["processors"]
    if EXCEPTIONS not in processors:
        structlog.configure(processors=[EXCEPTIONS, *processors])


@pytest.fixture(autouse=True)
def fail_on_logged_exception(request: pytest.FixtureRequest) -> Iterator[None]:
    """A service survives a bug in a handler or callback by logging it; a test must not."""
    before = EXCEPTIONS.count
    yield
    marker = request.node.get_closest_marker("logged_exceptions")
    expected = marker.args[0] if marker else 0
    logged = EXCEPTIONS.count - before
    assert logged == expected, f"{logged} exception(s) logged (see the captured log)"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The session's mosquitto, secure as `edgecollab up` runs it. Its folder is the state dir
    of this session, so the CLI finds an operator account there by itself, as on the box."""
    broker = Broker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    saved = os.environ.get("EDGECOLLAB_STATE_DIR")
    os.environ["EDGECOLLAB_STATE_DIR"] = str(broker.workdir)
    yield broker
    if saved is None:
        os.environ.pop("EDGECOLLAB_STATE_DIR", None)
    else:
        os.environ["EDGECOLLAB_STATE_DIR"] = saved
    broker.stop()


@pytest.fixture(scope="session")
def open_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker with docker/mosquitto.conf's limits but no accounts (anonymous, no ACL), for
    scale tests that publish 10,000 agents' cards from one client: on the secure broker only
    each agent may write its own."""
    broker = Broker(tmp_path_factory.mktemp("open-mosquitto"), secure=False)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def mqtt(broker: Broker) -> MqttSettings:
    """Where the broker is, with no account: `login` gives one."""
    return broker.anonymous


@pytest.fixture
def login(broker: Broker) -> Callable[..., MqttSettings]:
    """`login(name, role="client", tls=False)`: settings for an account of the test's own."""
    return broker.login


@pytest.fixture
def uid() -> str:
    """A short unique suffix, so tests never see each other's agents or retained entries."""
    return uuid.uuid4().hex[:8]


@asynccontextmanager
async def running(bus: Bus) -> AsyncIterator[Bus]:
    """Run a bus in the background for the duration of a block."""
    task = asyncio.create_task(bus.run())
    try:
        async with asyncio.timeout(10):
            await bus.connected.wait()
        yield bus
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def mqtt_client(settings: MqttSettings, **options: object) -> aiomqtt.Client:
    """An independent aiomqtt client logged in with `settings` (its account, TLS)."""
    password = settings.secret()
    return aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=password,
        identifier=settings.username,
        tls_context=settings.tls_context(),
        **options,  # type: ignore[arg-type]
    )


async def wait_for(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Wait, as long as a slow machine needs, until `predicate()` holds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def service_env(mqtt: MqttSettings) -> dict[str, str]:
    """A service's environment: the broker, its account (the secret as a file), TLS."""
    return child_env(mqtt, EDGECOLLAB_LOG_LEVEL="info", PYTHONUNBUFFERED="1")


@pytest.fixture
def spawn(broker: Broker, tmp_path: Path) -> Iterator:
    """Start `python -m services.<name> --agent-id <id> ...` processes, each with an account
    of its own (role: the service); all are killed at the end of the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(module: str, *args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{module}-{len(procs)}.log").open("wb")
        if "--agent-id" not in args:
            raise ValueError(f"spawn {module}: give --agent-id, the account it connects as")
        agent = args[args.index("--agent-id") + 1]
        account = broker.login(agent, module.removeprefix("services."))
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=service_env(account),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    for proc in procs:
        text = Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
        assert "Traceback (most recent call last)" not in text, f"{proc.args}: {text[-3000:]}"
