"""The edge-box stack: every service and its command line, shared by `up` and compose."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    """One service process: `python -m <module> <args>` (a compose service of the same name)."""

    name: str
    module: str
    args: tuple[str, ...] = ()

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module, *self.args]

    def local_command(self) -> list[str]:
        return self.command(sys.executable)


# Emulated workers stand for Jetson-class devices until a model folder is given (see README).
STACK: tuple[ServiceSpec, ...] = (
    ServiceSpec("orchestrator", "services.orchestrator", ("--agent-id", "orchestrator-1")),
    ServiceSpec(
        "worker-orin",
        "services.worker",
        (
            "--agent-id",
            "worker-orin",
            "--backend",
            "emulated",
            "--tokens-per-s",
            "60",
            "--concurrency",
            "8",
        ),
    ),
    ServiceSpec(
        "worker-nano",
        "services.worker",
        (
            "--agent-id",
            "worker-nano",
            "--backend",
            "emulated",
            "--tokens-per-s",
            "27.7",
            "--concurrency",
            "4",
        ),
    ),
)
