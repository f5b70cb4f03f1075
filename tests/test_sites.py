"""Computation across sites: two real sites (a mosquitto and a replicator each); a query at site
a, which has no worker, is answered by site b's worker (a tiny random-weight ONNX decoder), and
by the cloud once site b is gone.

No timing is asserted; every wait is for a CMS entry or an answer, with a generous timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas import Answer, Query, Task
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import RemoteError
from services.core.settings import MqttSettings
from services.core.topics import QUERIES, REMOTE_TASKS, REPLICATION_PEER
from tests.broker import ROOT, Broker
from tests.conftest import running, service_env, wait_for
from tools.bench.fake_cloud import FakeCloud
from tools.common.security import peer_account


class Services:
    """`python -m services.<name>` processes, each on its own site's broker."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self, mqtt: MqttSettings, module: str, *args: str, **env: str
    ) -> subprocess.Popen[bytes]:
        path = self.tmp_path / f"{module}-{len(self.procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env={**service_env(mqtt), **env},
            stdout=path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append((proc, path))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    def close(self) -> None:
        for proc, _ in self.procs:
            self.stop(proc)
        for proc, path in self.procs:
            text = path.read_text(errors="replace")
            assert "Traceback (most recent call last)" not in text, f"{proc.args}: {text[-3000:]}"


@pytest.fixture
def services(tmp_path: Path):  # type: ignore[no-untyped-def]
    started = Services(tmp_path)
    yield started
    started.close()


def peered(site: str, broker: Broker, peer: Broker) -> None:
    """`site`'s replicator may log in to `peer`'s broker: its account there, with the secret
    `site` made for it (before the brokers start)."""
    account = peer_account(site)
    broker.credentials.add([account])
    secret = broker.credentials.secret_file(account.name).read_text().strip()
    peer.credentials.add([account], secrets={account.name: secret})


def replicator(services: Services, site: str, broker: Broker, peer: Broker) -> None:
    """The replicator of `site`, linked to `peer`'s broker over TLS as peer-<site>."""
    services.start(
        broker.login(f"replicator-{site}", "replicator"),
        "services.replicator",
        "--agent-id",
        f"replicator-{site}",
        EDGECOLLAB_STATE_DIR=str(broker.workdir),
        EDGECOLLAB_REPLICATOR_SITE=site,
        EDGECOLLAB_REPLICATOR_PEERS=json.dumps([f"mqtts://{peer.host}:{peer.tls_port}"]),
        EDGECOLLAB_REPLICATOR_PEER_TLS_CA=str(peer.credentials.ca),
    )


async def ask(bus: Bus) -> Answer:
    query = Query(
        request_id=f"q{time.time_ns()}", text="hello", max_tokens=6, deadline=time.time() + 60
    )
    answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
    assert isinstance(answer, Answer)
    return answer


async def test_a_site_without_room_asks_its_neighbour_before_the_cloud(
    tmp_path, uid, services, tiny_model_dir
):
    a, b = Broker(tmp_path / "a"), Broker(tmp_path / "b")  # each its own accounts and CA
    peered("a", a, b)
    peered("b", b, a)
    a.start()
    b.start()
    try:
        worker = f"w-{uid}"
        replicator(services, "a", a, b)
        services.start(
            b.login(worker, "worker"), "services.worker", "--agent-id", worker,
            "--backend", "onnx", "--model-dir", str(tiny_model_dir), "--concurrency", "1",
            EDGECOLLAB_STATE_DIR=str(b.workdir),
        )  # fmt: skip
        replicator(services, "b", b, a)
        b_side = [proc for proc, _ in services.procs[-2:]]
        with FakeCloud(reply="from the cloud") as cloud:
            services.start(
                a.login(f"orch-{uid}", "orchestrator"), "services.orchestrator",
                "--agent-id", f"orch-{uid}", "--cloud-url", cloud.url,
                "--cloud-api-key", cloud.api_key, EDGECOLLAB_STATE_DIR=str(a.workdir),
            )  # fmt: skip
            operator = f"operator-{uid}"  # asks, and reads the links' state (cms/replication)
            bus = Bus(settings=a.login(operator, "operator"), client_id=operator, service="t")
            # a task straight to a neighbour's worker: what only an orchestrator may send
            sender = Bus(settings=a.login(f"o-{uid}", "orchestrator"), client_id=f"o-{uid}",
                         service="t")  # fmt: skip
            view = CmsView(bus)
            link = REPLICATION_PEER.format(site="b")

            def linked() -> bool:
                entry = view.get(link)
                return entry is not None and entry.value["connected"] and entry.value["rtt_ms"]

            async with running(bus), running(sender):
                remote = view.remote_agent
                await wait_for(lambda: view.online(f"orch-{uid}"), 60)
                await wait_for(lambda: (w := remote("b", worker)) is not None and w.online, 60)
                await wait_for(linked, 60)

                answer = await ask(bus)
                assert answer.outcome == "edge", answer
                step = answer.steps[-1]
                assert (step.where, step.agent, step.site) == ("edge", worker, "b"), step
                assert step.topic == REMOTE_TASKS.format(site="b", agent=worker)
                assert step.output_tokens > 0 and not cloud.requests

                task = Task(
                    task_id="t1", request_id="r1", prompt="hi", max_tokens=4,
                    deadline=time.time() + 30,
                )  # fmt: skip
                for site, agent, says in (("zz", worker, "no link"), ("b", "nobody", "site b")):
                    with pytest.raises(RemoteError, match=says) as refused:
                        topic = REMOTE_TASKS.format(site=site, agent=agent)
                        await sender.request(topic, task, deadline=task.deadline)
                    assert refused.value.error.code == "unavailable"

                for proc in b_side:
                    services.stop(proc)
                b.stop()
                await wait_for(lambda: not view.get(link).value["connected"], 60)  # type: ignore[union-attr]
                answer = await ask(bus)
                assert answer.outcome == "cloud" and answer.text == "from the cloud", answer
                assert [s.where for s in answer.steps][-1:] == ["cloud"]
    finally:
        a.stop()
        b.stop()
