"""`edgecollab up`'s scaling loop: `cms/scaling/<model>/desired_instances` → workers started or
stopped here, `cms/scaling/<model>/current_instances` ← how many of them are online.

A model is scalable by an `up` that runs a worker of it (its first worker is the template: new
instances are `<prefix>-<n>`, the lowest free n; the newest stop first). A desired count must be
a whole number from 0 to `max_instances`, and the instances it adds must fit in the memory
available now (each counted as its model folder's size plus a process's overhead); otherwise it
is refused with an Error on errors/up and a line of `up`'s output, and nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from pydantic import StrictInt, TypeAdapter, ValidationError

from schemas import CmsEntry
from services.core import cms
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.settings import MqttSettings, RuntimeSettings
from services.core.topics import AGENT_CARD, AGENT_STATUS, SCALING
from tools.common.stack import ServiceSpec, renamed
from tools.common.supervise import Child, Supervisor

PROCESS_MB = 150.0  # a worker's Python, onnxruntime and tokenizer beyond its model's files
EMULATED = "emulated"  # the model name of emulated workers (no model: they sleep per token)
_COUNT = TypeAdapter(StrictInt)


@dataclass
class Pool:
    """The workers of one model that this `up` runs."""

    model: str
    template: ServiceSpec
    memory_mb: float  # one more instance's estimate
    running: list[str] = field(default_factory=list)  # instance names, oldest first
    current: int | None = None  # last published current_instances


def pools(specs: list[ServiceSpec], runtime: RuntimeSettings) -> dict[str, Pool]:
    """The scalable models of these services: each worker's model, its first worker a template."""
    found: dict[str, Pool] = {}
    for spec in specs:
        if spec.module != "services.worker":
            continue
        model, memory_mb = _model_of(spec, runtime)
        pool = found.setdefault(model, Pool(model, spec, memory_mb))
        pool.running.append(spec.name)
    return found


def _model_of(spec: ServiceSpec, runtime: RuntimeSettings) -> tuple[str, float]:
    """A worker spec's model name and the memory one instance of it takes (estimated)."""
    if _arg(spec, "--backend") != "onnx":
        return EMULATED, PROCESS_MB
    folder = runtime.model_dir(_arg(spec, "--model-dir") or "SmolLM2-135M-Instruct")
    try:
        name = str(json.loads((folder / "model.json").read_text())["name"])
    except (OSError, ValueError, KeyError):
        name = Path(folder).name
    size = sum(f.stat().st_size for f in Path(folder).glob("*") if f.is_file())
    return name, size / 2**20 + PROCESS_MB


def _arg(spec: ServiceSpec, flag: str) -> str | None:
    args = list(spec.args)
    return args[args.index(flag) + 1] if flag in args else None


class Scaler:
    """Acts on desired_instances with `supervisor`, publishes current_instances; its bus runs
    in a thread of its own (the supervisor's loop is synchronous)."""

    def __init__(
        self,
        supervisor: Supervisor,
        pools: dict[str, Pool],
        child: Callable[[ServiceSpec], Child],
        *,
        max_instances: int,
        say: Callable[[str], None],
        available_mb: Callable[[], float] = lambda: psutil.virtual_memory().available / 2**20,
    ) -> None:
        self.supervisor, self.pools, self.child = supervisor, pools, child
        self.max_instances, self.say, self.available_mb = max_instances, say, available_mb
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, mqtt: MqttSettings) -> None:
        threading.Thread(target=asyncio.run, args=(self.run(mqtt),), daemon=True).start()

    async def run(self, mqtt: MqttSettings) -> None:
        client_id = mqtt.username or f"up-{uuid.uuid4().hex[:8]}"  # the broker's client id
        self.bus = Bus(settings=mqtt, client_id=client_id, service="up")
        self.view = CmsView(self.bus)
        self.view.on_change(self._on_change)
        self.bus.on_connect(self._republish)
        await self.bus.run()

    def _on_change(self, key: str, entry: CmsEntry | None) -> None:
        scaling = SCALING.match(key)
        if scaling is not None and scaling["name"] == "desired_instances" and entry is not None:
            self.desire(scaling["model"], entry.value, key)
            return
        agent = AGENT_STATUS.match(key) or AGENT_CARD.match(key)
        for pool in self.pools.values():
            if agent is not None and agent["agent"] in pool.running:
                self._publish_current(pool)

    def desire(self, model: str, value: object, key: str) -> None:
        """Start or stop workers of `model` until `value` of them run (or say why not)."""
        pool = self.pools.get(model)
        if pool is None:
            known = ", ".join(self.pools) or "none"
            return self._refuse(key, f"no worker of model {model!r} here (scalable: {known})")
        try:
            wanted = _COUNT.validate_python(value)
        except ValidationError:
            wanted = -1
        if not 0 <= wanted <= self.max_instances:
            return self._refuse(
                key, f"{value!r} is not a whole number from 0 to {self.max_instances} "
                "(up --max-instances)",
            )  # fmt: skip
        more = wanted - len(pool.running)
        available = self.available_mb()
        if more > 0 and more * pool.memory_mb > available:
            fit = int(available // pool.memory_mb)
            return self._refuse(
                key, f"{more} more instance(s) of {model} need ~{more * pool.memory_mb:.0f} MB, "
                f"{available:.0f} MB available: at most {fit} more fit",
            )  # fmt: skip
        for _ in range(more):
            name = self._free_name(pool.template)
            pool.running.append(name)
            self.supervisor.add(self.child(renamed(pool.template, name)))
        for name in pool.running[wanted:][::-1]:
            pool.running.remove(name)
            self.supervisor.retire(name)
        self._publish_current(pool)

    def _free_name(self, template: ServiceSpec) -> str:
        prefix = template.name.rsplit("-", 1)[0]
        taken = {n for pool in self.pools.values() for n in pool.running}
        names = (f"{prefix}-{i}" for i in range(1, len(taken) + 2))
        return next(name for name in names if name not in taken)

    def _refuse(self, key: str, problem: str) -> None:
        self.say(f"scaling refused: {key}: {problem}")
        self.bus.report("bad_request", f"{key}: {problem}", key)

    async def _republish(self) -> None:
        for pool in self.pools.values():
            pool.current = None
            self._publish_current(pool)

    def _publish_current(self, pool: Pool) -> None:
        online = sum(self.view.online(name) for name in pool.running)
        if online == pool.current or not self.bus.connected.is_set():
            return
        pool.current = online
        key = SCALING.format(model=pool.model, name="current_instances")
        version = time.time_ns() // 1000  # increases across restarts of `up`
        task = asyncio.get_running_loop().create_task(
            cms.put(self.bus, key, online, version=version)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
