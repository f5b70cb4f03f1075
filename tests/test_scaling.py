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
from services.core.settings import MqttSettings
from services.core.topics import ERRORS, SCALING
from tests.broker import ROOT
from tests.conftest import running, wait_for
from tests.test_configs import tiny_named
from tools.common.broker import broker_answers, free_port


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
         "--max-instances", "3", "--broker", f"127.0.0.1:{port}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not broker_answers("127.0.0.1", port) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        bus = Bus(settings=MqttSettings(host="127.0.0.1", port=port), client_id="op", service="t")
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
