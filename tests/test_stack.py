"""The services as processes on a real broker: plain MQTT clients, Last Will, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from schemas import Answer, CmsEntry, Query
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import QUERIES
from tests.conftest import running, wait_for

UNREACHABLE = '"event": "broker.unreachable"'  # a service's log line for each failed try


def online(view: CmsView, *agents: str):  # type: ignore[no-untyped-def]
    return lambda: view.online(*agents)


def start_stack(spawn, uid: str, *, tokens_per_s: str = "200", concurrency: str = "4"):  # type: ignore[no-untyped-def]
    orchestrator = spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    worker = spawn(
        "services.worker",
        "--agent-id",
        f"w-{uid}",
        "--tokens-per-s",
        tokens_per_s,
        "--concurrency",
        concurrency,
    )
    return orchestrator, worker


async def ask(bus: Bus, text: str = "hello", *, max_tokens: int = 8, timeout: float = 10) -> Answer:
    query = Query(
        request_id=f"q{time.time_ns()}",
        text=text,
        max_tokens=max_tokens,
        deadline=time.time() + timeout,
    )
    answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
    assert isinstance(answer, Answer)
    return answer


async def test_plain_mqtt_clients_use_the_stack(login, uid, spawn, broker, tmp_path):
    start_stack(spawn, uid)
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        await wait_for(online(view, f"orch-{uid}", f"w-{uid}"))
    query = {
        "v": 1,
        "type": "query",
        "request_id": f"rr-{uid}",
        "text": "hello from rr",
        "max_tokens": 5,
        "deadline": time.time() + 10,
    }
    # mosquitto's clients read their options (the account too) from $XDG_CONFIG_HOME/<client>
    rr_account = login(f"rr-{uid}")
    options = tmp_path / "mosquitto_rr"
    options.write_text(f"-u {rr_account.username}\n-P {rr_account.secret()}\n")
    rr = subprocess.run(
        [
            "mosquitto_rr",
            "-V",
            "mqttv5",
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-t",
            "computation/queries",
            "-e",
            f"replies/rr-{uid}",
            "-m",
            orjson.dumps(query),
            "-W",
            "30",
        ],
        capture_output=True,
        timeout=60,
        check=True,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
    )
    answer = Answer.model_validate_json(rr.stdout)
    assert answer.request_id == f"rr-{uid}" and answer.outcome == "edge"
    assert answer.steps[0].agent == f"w-{uid}" and answer.steps[0].output_tokens == 5
    # the README's observer one-liner: XDG_CONFIG_HOME=<state dir>/security/observer
    sub = subprocess.run(
        [
            "mosquitto_sub",
            "-V",
            "mqttv5",
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-v",
            "-t",
            f"cms/agents/w-{uid}/#",  # the card too: '#' matches the parent level
            "-C",
            "2",  # the two retained entries, sent on subscribing before anything new
            "-W",
            "30",
        ],
        capture_output=True,
        timeout=60,
        check=True,
        env={**os.environ, "XDG_CONFIG_HOME": str(broker.credentials.root / "observer")},
    )
    lines = dict(line.split(" ", 1) for line in sub.stdout.decode().splitlines())
    card = CmsEntry.model_validate_json(lines[f"cms/agents/w-{uid}"]).value
    status = CmsEntry.model_validate_json(lines[f"cms/agents/w-{uid}/status"]).value
    assert card["backend"] == "emulated" and card["concurrency"] == 4
    assert status["online"] is True


async def test_sigkill_flips_status_offline_and_restart_raises_epoch(login, uid, spawn):
    worker = spawn("services.worker", "--agent-id", f"w-{uid}")
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        await wait_for(online(view, f"w-{uid}"))
        first_epoch = view.agent(f"w-{uid}").card.epoch
        worker.send_signal(signal.SIGKILL)
        await wait_for(lambda: not view.agent(f"w-{uid}").online)
        assert view.statuses[f"w-{uid}"].online is False
        spawn("services.worker", "--agent-id", f"w-{uid}")
        await wait_for(online(view, f"w-{uid}"))
        assert view.agent(f"w-{uid}").card.epoch == first_epoch + 1


async def test_stack_survives_a_broker_restart(login, uid, spawn, broker):
    start_stack(spawn, uid)
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        await wait_for(online(view, f"orch-{uid}", f"w-{uid}"))
        assert (await ask(bus)).outcome == "edge"
        broker.stop()
        late = spawn("services.worker", "--agent-id", f"late-{uid}")  # starts before the broker
        log = Path(late.log_path)
        # a second try at the broker: the first failure did not end it
        await wait_for(lambda: late.poll() is not None or log.read_text().count(UNREACHABLE) >= 2)
        assert late.poll() is None, "a service must wait for its broker, not exit"
        broker.start()
        await wait_for(lambda: bus.connected.is_set(), timeout=30)
        await wait_for(online(view, f"orch-{uid}", f"w-{uid}", f"late-{uid}"), timeout=30)
        answer = await ask(bus)
    assert answer.outcome == "edge" and answer.steps[0].agent in (f"w-{uid}", f"late-{uid}")


async def test_worker_killed_mid_task_fails_the_request_before_its_deadline(login, uid, spawn):
    _, worker = start_stack(spawn, uid, tokens_per_s="5")
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        await wait_for(online(view, f"orch-{uid}", f"w-{uid}"))
        pending = asyncio.create_task(ask(bus, max_tokens=100, timeout=30))
        await wait_for(lambda: view.statuses[f"w-{uid}"].active == 1)
        os.kill(worker.pid, signal.SIGKILL)
        answer = await pending
    # "went offline": the Last Will ended the wait, not the deadline ("no answer ... within")
    assert answer.outcome == "failed" and "went offline" in answer.steps[0].detail


def _query(text: str) -> bytes:
    return orjson.dumps({"v": 1, "type": "query", "request_id": "q1", "text": text,
                         "deadline": time.time() + 10})  # fmt: skip


@pytest.mark.parametrize(
    "payload",
    [b"{oops", b'{"v": 7, "type": "query"}', b"x" * (1 << 20), _query(""), _query("x" * 100_000)],
    ids=["bad-json", "bad-version", "1MB", "empty-query", "100k-chars-query"],
)
async def test_orchestrator_answers_bad_queries_and_keeps_serving(login, uid, spawn, payload):
    start_stack(spawn, uid)
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        await wait_for(online(view, f"orch-{uid}", f"w-{uid}"))
        from services.core.errors import RemoteError

        with pytest.raises(RemoteError) as raised:
            await bus.request_raw(QUERIES.format(), payload, deadline=time.time() + 5)
        assert raised.value.error.service == "orchestrator"
        assert (await ask(bus)).outcome == "edge"
