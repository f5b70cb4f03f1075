"""`edgecollab up` follows cms/scaling/<model>/desired_instances: a real `up` with its own
mosquitto and tiny-model workers, driven through the CMS as an operator would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

from schemas import Error
from services.core import cms
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.settings import MqttSettings, RuntimeSettings
from services.core.topics import ERRORS, SCALING
from tests.broker import ROOT
from tests.conftest import running, wait_for
from tests.test_configs import tiny_named
from tools.common.broker import broker_answers, free_port
from tools.common.credentials import Credentials
from tools.common.scaling import PROCESS_MB, Scaler, pools
from tools.common.stack import ServiceSpec
from tools.common.supervise import Child


async def test_up_starts_and_stops_workers_to_match_desired_instances(tmp_path, tiny_model_dir):
    port, model = free_port(), "tiny-scaled"
    # up's worker-1 loads models/SmolLM2-135M-Instruct: here, the tiny model under that folder
    tiny_named(tiny_model_dir, tmp_path / "models" / "SmolLM2-135M-Instruct", model)
    env = {
        **os.environ,
        "EDGECOLLAB_STATE_DIR": str(tmp_path / "state"),
        "EDGECOLLAB_MODELS_DIR": str(tmp_path / "models"),
        "EDGECOLLAB_WORKER_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "tools.cli.main", "up", "--only", "worker",
         "--max-instances", "3", "--broker", f"127.0.0.1:{port}",
         "--tls-port", str(free_port()), "--cert-port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not broker_answers("127.0.0.1", port) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        local = Credentials.of_state_dir(tmp_path / "state")  # up made them: an operator's
        seat = local.operator_seat()  # not the one up holds (its scaling loop's)
        assert seat is not None
        operator = local.settings(seat, MqttSettings(host="127.0.0.1", port=port))
        bus = Bus(settings=operator, client_id=seat, service="t")
        view = CmsView(bus)
        errors: asyncio.Queue[Error] = asyncio.Queue()
        bus.listen(ERRORS, lambda request: errors.put_nowait(request.body), service="up")
        desired = SCALING.format(model=model, name="desired_instances")
        current = SCALING.format(model=model, name="current_instances")

        def now_current(n: int, *online: str):  # type: ignore[no-untyped-def]
            def check() -> bool:
                entry = view.get(current)
                return entry is not None and entry.value == n and view.online(*online)

            return check

        async def refusal() -> Error:
            async with asyncio.timeout(30):
                return await errors.get()

        async with running(bus):
            await wait_for(now_current(1, "worker-1"), timeout=60)
            await cms.put(bus, desired, 2, version=1)
            await wait_for(now_current(2, "worker-1", "worker-2"), timeout=60)
            await cms.put(bus, desired, 1, version=2)
            await wait_for(now_current(1, "worker-1"), timeout=60)
            await wait_for(lambda: not view.online("worker-2"), timeout=30)
            refused = []
            for n, bad in enumerate((99, "two", -1, 1.5), start=3):
                await cms.put(bus, desired, bad, version=n)
                refused.append((await refusal()).message)
            other = SCALING.format(model="no-such-model", name="desired_instances")
            await cms.put(bus, other, 1, version=1)
            unknown = (await refusal()).message
            assert view.get(current).value == 1 and view.online("worker-1")
        up.send_signal(signal.SIGINT)
        up.wait(60)
    finally:
        if up.poll() is None:
            up.kill()
        reader.join(10)
    output = "".join(lines)
    assert up.returncode == 0, output[-3000:]
    assert "up: worker-2 started" in output and "up: worker-2 stopped" in output
    assert all("not a whole number from 0 to 3" in m for m in refused), refused
    assert "no worker of model 'no-such-model' here (scalable: tiny-scaled)" in unknown
    assert "Traceback" not in output


async def test_scaling_refuses_instances_that_do_not_fit_in_memory(login, uid):
    class Hands:  # what the Supervisor would be asked to do
        def __init__(self) -> None:
            self.added: list[str] = []

        def add(self, child: Child) -> None:
            self.added.append(child.name)

    spec = ServiceSpec(f"e{uid}-1", "services.worker", ("--agent-id", f"e{uid}-1"))
    found = pools([spec], RuntimeSettings())
    hands, said = Hands(), []
    scaler = Scaler(
        hands, found, lambda s: Child(s.name, lambda: None), max_instances=8,  # type: ignore[arg-type]
        say=said.append, available_mb=lambda: 2.5 * PROCESS_MB,
    )  # fmt: skip
    task = asyncio.create_task(scaler.run(login(f"operator-{uid}", "operator")))
    try:
        await wait_for(lambda: hasattr(scaler, "bus") and scaler.bus.connected.is_set())
        scaler.desire("emulated", 4, "cms/scaling/emulated/desired_instances")
        refused = list(hands.added)
        scaler.desire("emulated", 3, "cms/scaling/emulated/desired_instances")
    finally:
        task.cancel()
    assert refused == [] and hands.added == [f"e{uid}-2", f"e{uid}-3"]
    assert "3 more instance(s) of emulated need ~450 MB, 375 MB available: at most 2" in said[0]
