"""Helpers for tests of the HTTP gateway: its key file, its start, waiting until it is ready."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tools.common.broker import free_port


@dataclass
class GatewayProcess:
    url: str  # http://127.0.0.1:<port>
    key: str  # the key of tenant `tenant`
    tenant: str
    agent: str
    keys: dict[str, str]  # every key in its key file → tenant

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


def write_key_file(path: Path, keys: dict[str, str]) -> Path:
    path.write_text("".join(f"{key} {tenant}\n" for key, tenant in keys.items()))
    path.chmod(0o600)
    return path


def start_gateway(spawn, uid: str, tmp: Path, *args: str, tenants: tuple[str, ...] = ("main",)):  # type: ignore[no-untyped-def]
    """A gateway on a free port with one key per tenant (`<tenant>-<uid>`)."""
    keys = {f"key-{tenant}-{uid}-0123456789": f"{tenant}-{uid}" for tenant in tenants}
    key_file = write_key_file(tmp / f"keys-{uid}", keys)
    port = free_port()
    agent = f"gw-{uid}"
    spawn(
        "services.gateway",
        "--agent-id",
        agent,
        "--port",
        str(port),
        "--api-key-file",
        str(key_file),
        *args,
    )
    first = next(iter(keys))
    return GatewayProcess(f"http://127.0.0.1:{port}", first, keys[first], agent, keys)


def wait_ready(gateway: GatewayProcess, timeout: float = 60.0, **online: int) -> dict[str, Any]:
    """Poll /health until the gateway's own CMS view has `online` agents of each kind."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            health = httpx.get(gateway.url + "/health", timeout=5).json()
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
        else:
            last = health
            counts = health.get("online", {})
            if health.get("bus") == "connected" and all(
                counts.get(kind, 0) >= n for kind, n in online.items()
            ):
                return health
        time.sleep(0.1)
    raise AssertionError(f"gateway not ready after {timeout:.0f} s: {last}")
