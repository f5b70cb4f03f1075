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
    # Across sites: its site name and peers come from EDGECOLLAB_REPLICATOR_SITE / _PEERS
    # (`edgecollab up --site NAME --peer URL`); with no peers it only keeps the tombstones.
    ServiceSpec("replicator", "services.replicator", ("--agent-id", "replicator-1")),
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
    # The OpenAI-compatible HTTP API and the dashboard (127.0.0.1:8080 unless configured).
    ServiceSpec("gateway", "services.gateway", ("--agent-id", "gateway-1")),
    # The knowledge base (knowledge/<domain>/retrieve): health and environment passages, cited.
    ServiceSpec("kb", "services.kb", ("--agent-id", "kb-1")),
    # The sandboxed calculator peer (knowledge/arithmetic/run): math answered by a program.
    ServiceSpec("sandbox", "services.sandbox", ("--agent-id", "sandbox-1")),
    # The code (and math, by program) expert: Qwen2.5-Coder-0.5B-Instruct, a second model family;
    # it also answers facts where the general model shows a knowledge gap.
    ServiceSpec(
        "code-1",
        "services.worker",
        ("--agent-id", "code-1", "--backend", "onnx", "--model-dir", "Qwen2.5-Coder-0.5B-Instruct",
         "--concurrency", "2", "--domains", '["code","math","facts"]'),
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


def scaled(workers: int = 1, emulated: int = 0) -> tuple[ServiceSpec, ...]:
    """STACK with `workers` SLM workers (worker-1 ... worker-N, like worker-1) and `emulated`
    emulated devices (emulated-1 ...: an Orin Nano's rate and concurrency, docs/scheduling.md)."""
    template = next(s for s in STACK if s.name == "worker-1")
    real = tuple(renamed(template, f"worker-{i}") for i in range(1, workers + 1))
    fake = tuple(
        ServiceSpec(f"emulated-{i}", "services.worker",
                    ("--agent-id", f"emulated-{i}", "--backend", "emulated",
                     "--tokens-per-s", "27.7", "--concurrency", "4"))
        for i in range(1, emulated + 1)
    )  # fmt: skip
    return tuple(x for s in STACK for x in ((*real, *fake) if s is template else (s,)))


def renamed(spec: ServiceSpec, name: str) -> ServiceSpec:
    args = list(spec.args)
    args[args.index("--agent-id") + 1] = name
    return ServiceSpec(name, spec.module, tuple(args))
