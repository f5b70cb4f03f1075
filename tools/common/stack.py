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

    @property
    def agent(self) -> str:
        """Its agent id (`--agent-id`): also its account, username and client id."""
        return self.args[self.args.index("--agent-id") + 1]

    @property
    def role(self) -> str:
        """Its account's role (tools/common/security.py): the service's name."""
        return self.module.removeprefix("services.")

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module, *self.args]

    def local_command(self) -> list[str]:
        return self.command(sys.executable)


# Model folders are names under EDGECOLLAB_MODELS_DIR (made by tools/setup.sh, mounted in compose).
STACK: tuple[ServiceSpec, ...] = (
    ServiceSpec("orchestrator", "services.orchestrator", ("--agent-id", "orchestrator-1")),
    ServiceSpec(
        "classifier",
        "services.classifier",
        ("--agent-id", "classifier-1", "--model-dir", "all-MiniLM-L6-v2"),
    ),
    ServiceSpec(
        "worker-1",
        "services.worker",
        ("--agent-id", "worker-1", "--backend", "onnx", "--model-dir", "SmolLM2-135M-Instruct",
         "--concurrency", "4", "--domains", '["health","environment","general"]'),
    ),
    # Simulated devices: a feverish wearer (Fig. 5a) and a city block before an event (Fig. 5b).
    ServiceSpec(
        "wearable-1",
        "services.sensor",
        ("--agent-id", "wearable-1", "--profile", "wearable", "--event", "fever"),
    ),
    *(
        ServiceSpec(name, "services.sensor",
                    ("--agent-id", name, "--profile", "city", "--streams", streams,
                     "--event", "crowd", "--event-every-s", "600", "--event-for-s", "300"))
        for name, streams in (
            ("camera-1", '["camera"]'),
            ("air-1", '["pm25","no2"]'),
            ("noise-1", '["noise"]'),
            ("traffic-1", '["traffic"]'),
        )
    ),
)  # fmt: skip
