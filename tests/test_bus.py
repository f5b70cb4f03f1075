"""The bus against a real mosquitto: request/response, deadlines, bad input, the CMS view."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from schemas import AgentCard, Error, Query, Rejected, Task, TaskResult, now
from services.core import cms
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, NoSubscriber, RemoteError
from services.core.presence import card_entry
from services.core.topics import AGENT_CARD, ERRORS, TASKS, Address
from tests.conftest import mqtt_client, running, wait_for


def _task(uid: str, deadline_s: float = 5.0) -> Task:
    return Task(
        task_id=f"t-{uid}",
        request_id=f"r-{uid}",
        prompt="hi",
        max_tokens=4,
        deadline=time.time() + deadline_s,
    )


async def _echo_worker(request: Request[Task]) -> TaskResult:
    task = request.body
    return TaskResult(
        task_id=task.task_id,
        agent=request.params["agent"],
        text=task.prompt.upper(),
        prompt_tokens=1,
        output_tokens=1,
        prefill_ms=0,
        decode_tok_s=0,
        ms=0,
        finish_reason="stop",
    )


async def test_request_gets_its_reply(login, uid):
    server = Bus(settings=login(f"w-{uid}", "worker"), client_id=f"w-{uid}", service="worker")
    server.serve(TASKS, _echo_worker, agent=f"w-{uid}")
    client = Bus(settings=login(f"c-{uid}", "orchestrator"), client_id=f"c-{uid}", service="c")
    async with running(server), running(client):
        replies = await asyncio.gather(
            *(
                client.request(
                    TASKS.format(agent=f"w-{uid}"),
                    _task(f"{uid}{i}"),
                    deadline=time.time() + 5,
                )
                for i in range(20)
            )
        )
    assert [r.task_id for r in replies] == [f"t-{uid}{i}" for i in range(20)]
    assert all(isinstance(r, TaskResult) and r.text == "HI" for r in replies)


async def test_request_to_silent_agent_fails_at_its_deadline(login, uid):
    client = Bus(settings=login(f"c-{uid}", "orchestrator"), client_id=f"c-{uid}", service="c")
    topic = TASKS.format(agent=f"silent-{uid}")
    silent = mqtt_client(login(f"silent-{uid}", "worker"))
    async with running(client), silent:
        await silent.subscribe(topic, qos=1)  # takes every task, answers none
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="no answer"):
            await client.request(topic, _task(uid), deadline=time.time() + 0.5)
        assert time.monotonic() - started > 0.4  # not before its deadline


async def test_request_nobody_is_subscribed_to_fails_at_once(login, uid):
    client = Bus(settings=login(f"c-{uid}", "orchestrator"), client_id=f"c-{uid}", service="c")
    async with running(client):
        with pytest.raises(NoSubscriber, match=f"nobody-{uid}"):  # PUBACK 0x10, not a deadline
            await client.request(
                TASKS.format(agent=f"nobody-{uid}"), _task(uid), deadline=time.time() + 600
            )


@pytest.mark.logged_exceptions(1)
async def test_handler_exception_becomes_error_reply_and_service_survives(login, uid):
    calls = 0

    async def flaky(request: Request[Task]) -> Rejected:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return Rejected(
            task_id=request.body.task_id, agent=f"w-{uid}", reason="full", active=1, limit=1
        )

    server = Bus(settings=login(f"w-{uid}", "worker"), client_id=f"w-{uid}", service="worker")
    server.serve(TASKS, flaky, agent=f"w-{uid}")
    client = Bus(settings=login(f"c-{uid}", "orchestrator"), client_id=f"c-{uid}", service="c")
    async with running(server), running(client):
        topic = TASKS.format(agent=f"w-{uid}")
        with pytest.raises(RemoteError, match="internal: RuntimeError: boom"):
            await client.request(topic, _task(uid), deadline=time.time() + 5)
        reply = await client.request(topic, _task(uid + "b"), deadline=time.time() + 5)
    assert isinstance(reply, Rejected) and reply.reason == "full"


@pytest.mark.logged_exceptions(1)
async def test_listener_bug_is_counted_in_the_status_and_reading_goes_on(login, uid):
    from services.core.logging import EXCEPTIONS
    from services.core.presence import Presence

    seen: list[str] = []

    def listener(request: Request[Error]) -> None:
        seen.append(request.body.message)
        if len(seen) == 1:
            raise KeyError("a bug in a callback")

    card = AgentCard(agent=f"l-{uid}", kind="worker", epoch=1, started_at=now())
    presence = Presence(card)
    bus = Bus(settings=login(f"l-{uid}", "worker"), client_id=f"l-{uid}", service="t")
    view = CmsView(bus)
    reader = f"operator-{uid}"  # who reads errors/#
    errors = Bus(settings=login(reader, "operator"), client_id=reader, service="t")
    errors.listen(ERRORS, listener, service=f"s-{uid}")
    before = EXCEPTIONS.count
    async with running(bus), running(errors):
        for text in ("first", "second"):
            error = Error(code="internal", message=text, service="t", topic="t")
            await bus.publish(ERRORS.format(service=f"s-{uid}"), error)
        await wait_for(lambda: len(seen) == 2)
        await presence.publish_status(bus)
        await wait_for(lambda: f"l-{uid}" in view.statuses)
    assert seen == ["first", "second"] and EXCEPTIONS.count == before + 1
    assert view.statuses[f"l-{uid}"].exceptions == EXCEPTIONS.count


BAD_INPUTS = {
    "bad_json": b"{not json",
    "bad_schema": orjson.dumps({"v": 1, "type": "query", "text": "no id"}),
    "bad_version": orjson.dumps({"v": 2, "type": "task"}),
    "too_large": b"x" * (1 << 20),
}


@pytest.mark.parametrize("code", [*BAD_INPUTS, "unknown_topic", "other_schema"])
async def test_bad_input_is_answered_with_error_and_next_request_served(login, uid, code):
    agent = f"w-{uid}"
    server = Bus(settings=login(agent, "worker"), client_id=agent, service="worker")
    server.serve(TASKS, _echo_worker, agent=agent)
    client = Bus(settings=login(f"c-{uid}", "orchestrator"), client_id=f"c-{uid}", service="c")
    topic = TASKS.format(agent=agent)
    payload = BAD_INPUTS.get(code, b"")
    if code == "unknown_topic":
        # a device of another make may send anywhere: bypass the topic table on purpose
        topic = Address(topic + "/surprise", TASKS)
        payload = _task(uid).model_dump_json().encode()
    if code == "other_schema":
        payload = Query(request_id=f"r-{uid}", text="hi", deadline=now() + 5).model_dump_json()
        payload = payload.encode()
    async with running(server), running(client):
        with pytest.raises(RemoteError) as raised:
            await client.request_raw(topic, payload, deadline=time.time() + 5)
        expected = "bad_schema" if code == "other_schema" else code
        assert raised.value.error.code == expected
        reply = await client.request(
            TASKS.format(agent=agent), _task(uid), deadline=time.time() + 5
        )
    assert isinstance(reply, TaskResult)
    assert server.errors_sent == 1


async def test_bad_input_without_response_topic_goes_to_errors_topic(login, uid):
    agent = f"w-{uid}"
    server = Bus(settings=login(agent, "worker"), client_id=agent, service=f"worker-{uid}")
    server.serve(TASKS, _echo_worker, agent=agent)
    sender, reader = login(f"o-{uid}", "orchestrator"), login(f"operator-{uid}", "operator")
    async with running(server), mqtt_client(reader) as sub, mqtt_client(sender) as pub:
        await sub.subscribe(ERRORS.format(service=f"worker-{uid}"), qos=1)
        await pub.publish(TASKS.format(agent=agent), b"[1, 2]", qos=1)
        async with asyncio.timeout(30):
            message = await anext(sub.messages)
    error = Error.model_validate_json(message.payload)
    assert error.code == "bad_schema" and "JSON object" in error.message
    assert error.topic == TASKS.format(agent=agent)


async def test_cms_view_mirrors_puts_and_deletes_with_callbacks(login, uid):
    operator = f"operator-{uid}"  # who writes cms/parameters
    writer = Bus(settings=login(operator, "operator"), client_id=operator, service="cli")
    reader = Bus(settings=login(f"cr-{uid}"), client_id=f"cr-{uid}", service="cli")
    view = CmsView(reader)
    seen: list[tuple[str, object]] = []
    view.on_change(lambda key, entry: seen.append((key, entry and entry.value)))
    key = f"parameters/m-{uid}/temperature"
    async with running(writer), running(reader):
        await view.synced()
        await cms.put(writer, key, 0.7, version=1, expiry_s=60)
        await cms.delete(writer, key)
        await cms.put(writer, key, 0.2, version=3)
        await writer.barrier()
        async with asyncio.timeout(30):
            while len([k for k, _ in seen if k.endswith(key)]) < 3:
                await asyncio.sleep(0.01)
        assert view.get(key).version == 3 and view.get(key).origin == operator
        await cms.delete(writer, key)
    mine = [(k, v) for k, v in seen if k == f"cms/{key}"]
    assert mine[:3] == [(f"cms/{key}", 0.7), (f"cms/{key}", None), (f"cms/{key}", 0.2)]


async def test_fresh_view_receives_every_one_of_10000_retained_cards(open_broker, uid):
    count = 10_000
    prefix = f"s{uid}"
    writer = open_broker.anonymous  # one client for 10,000 agents: the broker without an ACL
    async with mqtt_client(writer, max_inflight_messages=1000) as pub:
        for i in range(count):
            agent = f"{prefix}-{i}"
            card = AgentCard(agent=agent, kind="sensor", epoch=1, started_at=now())
            body = card_entry(card).model_dump_json()
            await pub.publish(AGENT_CARD.format(agent=agent), body, qos=1, retain=True)
    reader = Bus(settings=writer, client_id=f"r-{uid}", service="cli")
    view = CmsView(reader)
    async with running(reader):
        await view.synced()
        mine = [a for a in view.cards if a.startswith(prefix + "-")]
    assert len(mine) == count
    async with mqtt_client(writer) as pub:  # leave the broker clean
        for i in range(count):
            await pub.publish(AGENT_CARD.format(agent=f"{prefix}-{i}"), b"", qos=0, retain=True)


def test_publish_properties_pack_as_paho_does() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from services.core.connection import PublishProperties

    paho_props = Properties(PacketTypes.PUBLISH)
    paho_props.MessageExpiryInterval = 30
    paho_props.ResponseTopic = "replies/client-é"
    paho_props.CorrelationData = bytes(range(16))
    ours = PublishProperties(
        expiry_s=30, response_topic="replies/client-é", correlation=bytes(range(16))
    )
    assert ours.pack() == paho_props.pack()
    assert PublishProperties().pack() == Properties(PacketTypes.PUBLISH).pack()


async def test_connection_to_a_closed_port_fails_clearly() -> None:
    from services.core.connection import Connection, ConnectionLost
    from services.core.settings import MqttSettings
    from tools.common.broker import free_port

    closed = MqttSettings(host="127.0.0.1", port=free_port())
    with pytest.raises(ConnectionLost, match="refused"):
        async with Connection(closed, client_id="nobody", on_message=print):
            pass


def _most_a_loopback_socket_holds() -> int:
    """Bytes a TCP connection can hold unread at most: both ends' buffers at the kernel's caps."""
    try:
        tcp = {n: int(Path(f"/proc/sys/net/ipv4/tcp_{n}mem").read_text().split()[2]) for n in "wr"}
        core = {n: int(Path(f"/proc/sys/net/core/{n}mem_max").read_text()) for n in "wr"}
    except (OSError, ValueError, IndexError):
        return 64 << 20
    # SO_SNDBUF/SO_RCVBUF double what they are given; autotuning stops at tcp_{w,r}mem[2]
    return sum(max(tcp[n], 2 * core[n]) for n in "wr")


async def test_a_stalled_broker_holds_publishers_back(tmp_path) -> None:
    """A full socket makes publish wait (memory stays bounded); it resumes as the broker reads."""
    import os
    import signal

    from tests.broker import Broker

    broker = Broker(tmp_path)
    settings = broker.login("stall", "worker")
    broker.start()
    bus = Bus(settings=settings, client_id="stall", service="t")
    big = Error(code="internal", message="x" * 200_000, service="test", topic="t")
    size, most = len(big.model_dump_json()), _most_a_loopback_socket_holds()
    count = most // size + 2  # more than the kernel can take in for a broker that does not read
    published = 0

    async def publish_all() -> None:
        nonlocal published
        for _ in range(count):
            await bus.publish(ERRORS.format(service="stall"), big)
            published += 1

    try:
        async with running(bus):
            connection = bus._client
            assert connection is not None
            held_back = asyncio.Event()
            drained = connection.drained

            async def watched_drained() -> None:  # publish awaits this after each packet
                if connection.held_back:  # the socket is full, or paho's in-flight window
                    held_back.set()
                await drained()

            connection.drained = watched_drained  # type: ignore[method-assign]
            os.kill(broker.proc.pid, signal.SIGSTOP)
            try:
                publishing = asyncio.create_task(publish_all())
                waiting = asyncio.create_task(held_back.wait())
                # without backpressure the publisher would finish first: all of it in memory
                await asyncio.wait(
                    {publishing, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED
                )
                waiting.cancel()
                assert held_back.is_set() and not publishing.done()
                assert published * size <= most  # what the kernel took in, no more
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)
            await asyncio.wait_for(publishing, 60)
        assert published == count
    finally:
        broker.stop()
