"""The dashboard: one page (plain HTML and JavaScript) kept live by server-sent events.

`/dashboard/events` sends the whole state when something changed (an answer, an agent's card or
status, a metric), at most 4 times a second and at least every 2 s; `/dashboard/state` is the
same object once. The paper's Fig. 6 comes from the simulator's last `edgecollab simulate
--publish` (cms/experiments/fig6), drawn as SVG by the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from services.core.cms import CmsView
from services.core.topics import EXPERIMENT
from services.gateway.chat import model_name
from services.gateway.http import JSON
from services.gateway.service import Gateway

MIN_INTERVAL_S = 0.25  # at most 4 updates a second
HEARTBEAT_S = 2.0  # and one at least this often


class Dashboard:
    """The page, its state and its event stream, over the gateway and its CMS view."""

    def __init__(self, gateway: Gateway, view: CmsView) -> None:
        self.gateway = gateway
        self.view = view
        self.page = resources.files("services.gateway").joinpath("data/dashboard.html").read_bytes()

    def routes(self) -> list[Route]:
        return [
            Route("/", self.dashboard, methods=["GET"]),
            Route("/dashboard", self.dashboard, methods=["GET"]),
            Route("/dashboard/state", self.dashboard_state, methods=["GET"]),
            Route("/dashboard/events", self.dashboard_events, methods=["GET"]),
        ]

    async def dashboard(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html")

    async def dashboard_state(self, request: Request) -> Response:
        return JSON(self.state())

    async def dashboard_events(self, request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            while True:
                self.gateway.changed.clear()
                yield b"event: state\ndata: " + orjson.dumps(self.state()) + b"\n\n"
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEARTBEAT_S):
                        await self.gateway.changed.wait()
                await asyncio.sleep(MIN_INTERVAL_S)

        headers = {"cache-control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def state(self) -> dict[str, Any]:
        """What the dashboard shows, as one JSON object."""
        orchestrators = self.gateway.orchestrator_metrics()
        agents = []
        for agent in self.view.agents():
            card, status = agent.card, agent.status
            alive = agent.online and status is not None
            active, queued, rate = (
                (status.active, status.queued, status.tokens_per_s)
                if (alive and status is not None)
                else (0, 0, 0.0)
            )
            agents.append(
                {
                    "agent": card.agent,
                    "kind": card.kind,
                    "online": agent.online,
                    "model": model_name(card) if card.kind == "worker" else None,
                    "backend": card.backend,
                    "domains": card.domains,
                    "active": active,
                    "queued": queued,
                    "concurrency": card.concurrency,
                    "tokens_per_s": rate,
                }
            )
        return {
            "gateway": self.gateway.bus.client_id,
            "time": time.time(),
            "connected": self.gateway.bus.connected.is_set(),
            "agents": agents,
            "rates": self.gateway.rates(),
            "served": dict(self.gateway.served),
            "cloud_spend_usd": round(
                sum(float(m.get("cloud_cost_usd") or 0) for m in orchestrators.values()), 6
            ),
            "orchestrators": orchestrators,
            "agent_metrics": self.gateway.agent_metrics(),
            "recent": list(self.gateway.recent),
            "fig6": fig6.value if (fig6 := self.view.get(EXPERIMENT.format(name="fig6"))) else None,
        }
