"""`python -m services.gateway`: the OpenAI-compatible HTTP API and the dashboard."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any

import orjson
import structlog
import uvicorn

from schemas import AgentCard, now
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import ConfigError
from services.core.logging import configure_logging
from services.core.presence import Presence
from services.core.service import Loop, run_agent
from services.core.settings import MqttSettings, RuntimeSettings
from services.gateway.app import Api
from services.gateway.errors import ApiError
from services.gateway.keys import KeyRing
from services.gateway.service import Gateway
from services.gateway.settings import GatewaySettings

log = structlog.get_logger("edgecollab.gateway")


class _Server(uvicorn.Server):
    """uvicorn inside the service's loop: the service, not uvicorn, handles the signals."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        await self._serve(sockets)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts (a clear error if taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only for that proto,
    # and without it Nagle holds each response's body ~40 ms behind its headers.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _Starting:
    """The ASGI app until the bus is up: every request gets 503 (the broker is not reachable
    yet), so clients hear at once instead of waiting on a socket nobody serves."""

    def __init__(self) -> None:
        self.app: Any | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        error = ApiError(
            503, "the gateway is starting: its MQTT broker is not reachable yet", code="no_broker"
        )
        body = orjson.dumps(error.body())
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def serve(
    settings: GatewaySettings,
    mqtt: MqttSettings,
    *,
    keys: dict[str, str],
    sock: socket.socket,
) -> None:
    """HTTP from the start; the API proper once the bus is up; both stop on SIGTERM."""
    app = _Starting()
    config = uvicorn.Config(
        app,
        http="httptools",
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = _Server(config)

    def card(epoch: int) -> AgentCard:
        return AgentCard(agent=settings.agent_id, kind="gateway", epoch=epoch, started_at=now())

    def setup(bus: Bus, presence: Presence) -> list[Loop]:
        view = CmsView(bus)
        gateway = Gateway(bus=bus, view=view, recent=settings.recent)
        presence.load = lambda: (gateway.in_flight, 0, 0.0)
        api = Api(
            gateway=gateway,
            view=view,
            keys=KeyRing(keys),
            default_max_tokens=settings.max_tokens,
            timeout_s=settings.timeout_s,
        )
        app.app = api.app()
        return []

    serving = asyncio.create_task(server.serve(sockets=[sock]))
    host, port = sock.getsockname()[:2]
    log.info(
        "gateway.listening", url=f"http://{host}:{port}/v1", dashboard=f"http://{host}:{port}/"
    )
    try:
        await run_agent(mqtt, agent=settings.agent_id, service="gateway", card=card, setup=setup)
    finally:
        server.should_exit = True  # open streams get timeout_graceful_shutdown, then are cut
        await serving


def main() -> None:
    settings, runtime = GatewaySettings(), RuntimeSettings()
    configure_logging("gateway", level=runtime.log_level)
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    try:
        keys = settings.keys()
        sock = listen(settings.host, settings.port)
    except ConfigError as exc:
        sys.exit(f"gateway: {exc}")
    asyncio.run(serve(settings, MqttSettings(), keys=keys, sock=sock))


if __name__ == "__main__":
    main()
