"""Faults survived: every request is answered, or refused with a reason, never lost in silence."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from aiomqtt import ProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from schemas import Answer, Query, Task, TaskResult, TokenChunk
from services.core.bus import Bus, Request
from services.core.client import QueryClient
from services.core.cms import CmsView
from services.core.topics import REPLIES, STREAM, TASKS
from services.core.transcript import Transcript
from services.orchestrator.dispatch import CONTINUE
from services.worker.emulated import _text as emulated_text
from tests.conftest import mqtt_client, running, wait_for
from tests.test_stack import online
from tools.bench.fake_cloud import FakeCloud


def _query(uid: str, n: int, *, max_tokens: int = 8, timeout: float = 60) -> Query:
    return Query(
        request_id=f"q{n}-{uid}", text="hello", max_tokens=max_tokens,
        deadline=time.time() + timeout,
    )  # fmt: skip


def _worker(spawn, agent: str, tokens_per_s: str = "200"):  # type: ignore[no-untyped-def]
    return spawn(
        "services.worker", "--agent-id", agent, "--tokens-per-s", tokens_per_s,
        "--concurrency", "4",
    )  # fmt: skip


async def _busy_worker_fails(  # type: ignore[no-untyped-def]
    login, uid, spawn, requests: int, fault: signal.Signals
) -> list[Answer]:
    """`requests` long queries on a slow worker; a spare worker joins; the slow one gets
    `fault` (SIGKILL or SIGSTOP, then SIGCONT once every query is answered)."""
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}", "--policy", "load_aware")
    busy = _worker(spawn, f"busy-{uid}", tokens_per_s="2")
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    client = QueryClient(bus, view)
    async with running(bus):
        await wait_for(online(view, f"orch-{uid}", f"busy-{uid}"))
        queries = [_query(uid, n, max_tokens=200) for n in range(requests)]
        asked = [asyncio.create_task(client.ask(q)) for q in queries]
        await wait_for(lambda: view.statuses[f"busy-{uid}"].active == requests)
        _worker(spawn, f"spare-{uid}")
        await wait_for(online(view, f"spare-{uid}"))
        os.kill(busy.pid, fault)
        try:
            return await asyncio.gather(*asked)
        finally:
            if fault is signal.SIGSTOP:
                os.kill(busy.pid, signal.SIGCONT)


async def test_a_killed_workers_tasks_are_answered_by_another(login, uid, spawn):
    answers = await _busy_worker_fails(login, uid, spawn, 4, signal.SIGKILL)
    for answer in answers:
        assert answer.outcome == "edge", answer
        first, last = answer.steps[-2], answer.steps[-1]  # provenance shows both attempts
        assert (first.agent, first.outcome) == (f"busy-{uid}", "failed")
        assert (last.agent, last.outcome) == (f"spare-{uid}", "ok")


async def test_a_streamed_answer_cut_off_by_a_dead_worker_goes_on_where_it_stopped(
    login, uid, spawn
):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}", "--policy", "load_aware")
    slow = _worker(spawn, f"slow-{uid}", tokens_per_s="2")
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    client = QueryClient(bus, view)
    heard: list[TokenChunk] = []
    async with running(bus):
        await wait_for(online(view, f"orch-{uid}", f"slow-{uid}"))
        query = _query(uid, 0, max_tokens=200).model_copy(update={"stream": True})
        await bus.follow(
            STREAM, lambda r: heard.append(r.body), client=f"c-{uid}", request=query.request_id
        )
        asked = asyncio.create_task(client.ask(query))
        await wait_for(lambda: len(heard) >= 3)
        _worker(spawn, f"spare-{uid}")
        await wait_for(online(view, f"spare-{uid}"))
        os.kill(slow.pid, signal.SIGKILL)
        answer = await asked
        await bus.barrier()
    first, last = answer.steps[-2], answer.steps[-1]
    assert (first.agent, first.outcome) == (f"slow-{uid}", "failed")
    assert (last.agent, last.outcome) == (f"spare-{uid}", "ok")
    assert "continued after" in (last.detail or "")
    # one stream: no chunk twice, none missing, from both workers, and the whole answer
    assert [c.seq for c in heard] == list(range(len(heard)))
    assert {c.agent for c in heard} == {f"slow-{uid}", f"spare-{uid}"}
    assert "".join(c.text for c in heard).split() == answer.text.split()
    assert answer.text.split() == emulated_text(200).split()  # what one worker would have said


async def test_a_stream_no_worker_can_finish_is_finished_by_the_cloud(login, uid, spawn):
    with FakeCloud(reply="and the cloud finished it.") as cloud:
        spawn("services.orchestrator", "--agent-id", f"orch-{uid}", "--cloud-url", cloud.url,
              "--cloud-api-key", cloud.api_key)  # fmt: skip
        only = _worker(spawn, f"only-{uid}", tokens_per_s="2")
        bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
        view = CmsView(bus)
        shown = Transcript()
        async with running(bus):
            await wait_for(online(view, f"orch-{uid}", f"only-{uid}"))
            query = _query(uid, 0, max_tokens=200).model_copy(update={"stream": True})
            await bus.follow(STREAM, lambda r: shown.add(r.body), client=f"c-{uid}",
                             request=query.request_id)  # fmt: skip
            asked = asyncio.create_task(QueryClient(bus, view).ask(query, shown))
            await wait_for(lambda: shown.seq >= 3)
            os.kill(only.pid, signal.SIGKILL)
            answer = await asked
        sent = cloud.requests[-1]["body"]["messages"]
    streamed = shown.text
    assert answer.outcome == "rejected_to_cloud" and answer.steps[-1].where == "cloud"
    assert answer.text == streamed + "and the cloud finished it."  # nothing said twice
    assert (shown.text + shown.rest(answer.text)) == answer.text
    # the cloud saw the start of the answer as its own turn, and was asked to go on
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == streamed and sent[2]["content"] == CONTINUE


async def test_a_rejected_task_is_served_by_a_worker_with_room(mqtt, login, uid, spawn):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}", "--policy", "random")
    for name in ("a", "b"):
        spawn("services.worker", "--agent-id", f"{name}-{uid}", "--tokens-per-s", "20",
              "--concurrency", "1")  # fmt: skip
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    second = Bus(settings=login(f"o2-{uid}", "orchestrator"), client_id=f"o2-{uid}", service="t")
    view = CmsView(bus)
    client = QueryClient(bus, view)
    async with running(bus), running(second):
        await wait_for(online(view, f"orch-{uid}", f"a-{uid}", f"b-{uid}"))
        # a second orchestrator's work, unknown to ours, fills worker a
        other = Task(task_id=f"t-{uid}", request_id=f"r-{uid}", prompt="x", max_tokens=200,
                     deadline=time.time() + 60)  # fmt: skip
        blocker = asyncio.create_task(
            second.request(TASKS.format(agent=f"a-{uid}"), other, deadline=other.deadline)
        )
        await wait_for(lambda: view.statuses[f"a-{uid}"].active == 1)
        answers = [await client.ask(_query(uid, n)) for n in range(6)]
        blocker.cancel()
    assert all(a.outcome == "edge" and a.steps[-1].agent == f"b-{uid}" for a in answers)
    retried = [a for a in answers if len(a.steps) > 2]
    assert all(a.steps[-2].outcome == "rejected" for a in retried)


async def test_a_query_sent_before_any_orchestrator_is_answered_once_one_is_up(
    mqtt, login, uid, spawn
):
    _worker(spawn, f"w-{uid}")
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    client = QueryClient(bus, CmsView(bus))
    async with running(bus):
        asked = asyncio.create_task(client.ask(_query(uid, 0)))
        await wait_for(lambda: client.retries >= 1)  # the broker said: nobody is subscribed
        spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
        answer = await asked
    assert isinstance(answer, Answer) and answer.outcome == "edge"


async def test_queries_of_a_killed_orchestrator_are_answered_by_the_other(mqtt, login, uid, spawn):
    first = spawn("services.orchestrator", "--agent-id", f"o1-{uid}")
    _worker(spawn, f"w-{uid}", tokens_per_s="4")
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    client = QueryClient(bus, view)
    async with running(bus):
        await wait_for(online(view, f"o1-{uid}", f"w-{uid}"))
        asked = [asyncio.create_task(client.ask(_query(uid, n, max_tokens=40))) for n in range(3)]
        await wait_for(lambda: view.statuses[f"w-{uid}"].active == 3)
        spawn("services.orchestrator", "--agent-id", f"o2-{uid}")
        await wait_for(online(view, f"o2-{uid}"))
        os.kill(first.pid, signal.SIGKILL)
        answers = await asyncio.gather(*asked)
    assert [a.outcome for a in answers] == ["edge"] * 3 and client.retries >= 3


async def test_a_stream_whose_orchestrator_died_goes_on_under_the_next(login, uid, spawn):
    orchestrators = {o: spawn("services.orchestrator", "--agent-id", o)
                     for o in (f"o1-{uid}", f"o2-{uid}")}  # fmt: skip
    _worker(spawn, f"w-{uid}", tokens_per_s="2")
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    # the worker's inbox is readable by it and an observer only
    watcher = Bus(settings=login(f"obs-{uid}", "observer"), client_id=f"obs-{uid}", service="t")
    view = CmsView(bus)
    client = QueryClient(bus, view)
    shown = Transcript()  # what `edgecollab ask` prints
    holders: list[str] = []  # the orchestrator each task of the worker answers to
    async with running(bus), running(watcher):
        await wait_for(online(view, *orchestrators, f"w-{uid}"))
        await watcher.follow(TASKS, lambda r: holders.append(r.reply_to), agent=f"w-{uid}")
        query = _query(uid, 0, max_tokens=24).model_copy(update={"stream": True})
        await bus.follow(
            STREAM, lambda r: shown.add(r.body), client=f"c-{uid}", request=query.request_id
        )
        asked = asyncio.create_task(client.ask(query, shown))
        await wait_for(lambda: shown.seq >= 3)
        holder = next(o for o in orchestrators if holders[0] == REPLIES.format(client=o))
        os.kill(orchestrators[holder].pid, signal.SIGKILL)
        answer = await asked
    assert client.retries >= 1 and "continued after" in (answer.steps[-1].detail or "")
    assert (shown.text + shown.rest(answer.text)).split() == answer.text.split()
    assert answer.text.split() == emulated_text(24).split()  # one answer, not two spliced


async def test_two_clients_may_use_the_same_correlation_bytes(mqtt, login, uid):
    async def echo(request: Request[Task]) -> TaskResult:
        body = request.body
        return TaskResult(
            task_id=body.task_id, agent=f"w-{uid}", text=body.prompt, prompt_tokens=1,
            output_tokens=1, prefill_ms=0, decode_tok_s=0, ms=0, finish_reason="stop",
        )  # fmt: skip

    server = Bus(settings=login(f"w-{uid}", "worker"), client_id=f"w-{uid}", service="worker")
    server.serve(TASKS, echo, agent=f"w-{uid}")
    texts = []
    async with running(server):
        for n in range(2):  # two requesters, each its own response topic, the same correlation
            reply_to = REPLIES.format(client=f"c{n}-{uid}")
            requester = login(f"c{n}-{uid}", "orchestrator")
            async with mqtt_client(requester, protocol=ProtocolVersion.V5) as c:
                await c.subscribe(reply_to, qos=1)
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic, props.CorrelationData = reply_to, b"1"
                task = Task(task_id=f"t{n}-{uid}", request_id="r1", prompt=f"from {n}",
                            max_tokens=1, deadline=time.time() + 30)  # fmt: skip
                await c.publish(TASKS.format(agent=f"w-{uid}"), task.model_dump_json(),
                                qos=1, properties=props)  # fmt: skip
                async with asyncio.timeout(30):
                    message = await anext(c.messages)
                texts.append(TaskResult.model_validate_json(message.payload).text)
    assert texts == ["from 0", "from 1"]


async def test_a_frozen_workers_tasks_go_elsewhere_before_its_will(login, uid, spawn):
    answers = await _busy_worker_fails(login, uid, spawn, 2, signal.SIGSTOP)
    assert [a.steps[-1].agent for a in answers] == [f"spare-{uid}"] * 2
    # moved on silence (a keepalive without a status), before the broker's Last Will at 1.5x
    assert all("fell silent" in (a.steps[-2].detail or "") for a in answers)
