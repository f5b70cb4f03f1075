"""A device joins by publishing: the next query of its domain uses it, and its values are the
answer's facts (the measured part is composed by code, whatever the worker writes)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from schemas import Answer, Query
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import QUERIES
from services.data.view import DataView
from tests.broker import ROOT
from tests.conftest import mqtt_client, running, wait_for


def readme_reading(agent: str, value: int, ts: int) -> str:
    """Exactly the JSON of README "Plug in a device"."""
    return (
        f'{{"v":1,"type":"reading","agent":"{agent}","domain":"health","stream":"heart_rate",'
        f'"value":{value},"unit":"bpm","ts":{ts}}}'
    )


def agents_json(mqtt) -> list[dict]:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "agents", "--kind", "sensor", "--json",
         "--broker", f"{mqtt.host}:{mqtt.port}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


async def test_a_device_publishing_as_the_readme_shows_is_used_by_the_next_health_query(
    mqtt, login, uid, spawn, minilm_dir
):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    spawn("services.worker", "--agent-id", f"slm-{uid}", "--tokens-per-s", "500",
          "--domains", '["health"]')  # fmt: skip
    watch, topic = f"watch-{uid}", f"data/health/heart_rate/watch-{uid}"
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus), mqtt_client(login(watch, "sensor")) as device:
        try:
            assert await view.wait_online([f"orch-{uid}", f"cls-{uid}", f"slm-{uid}"], timeout=90)
            now = int(time.time())
            for i in range(5):  # QoS 1: the broker has passed each on before the query goes
                await device.publish(topic, readme_reading(watch, 148, now - 4 + i), qos=1,
                                     retain=True)  # fmt: skip
            query = Query(
                request_id=f"q{time.time_ns()}",
                text="My heart is racing and I feel dizzy. Check my vitals: is anything wrong?",
                max_tokens=24,
                deadline=time.time() + 60,
            )
            answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
            listed = await asyncio.to_thread(agents_json, mqtt)
        finally:
            await device.publish(topic, b"", retain=True)

    assert isinstance(answer, Answer) and answer.outcome == "edge", answer
    step = next(s for s in answer.steps if s.name == f"data:{watch}")
    assert (step.agent, step.outcome, step.topic) == (watch, "ok", f"data/health/+/{watch}")
    assert step.detail == "discovered from its readings"
    assert [s.name for s in answer.steps][-2:] == ["knowledge:health", "answer"]
    [fact] = [f for f in answer.facts if f.agent == watch]
    assert (fact.stream, fact.value, fact.unit, fact.n, fact.alert) == (
        "heart_rate",
        148,
        "bpm",
        5,
        "tachycardia",
    )
    assert f"Measured by {watch} (5 readings, last 4 s): heart rate 148 bpm (steady), above " in (
        answer.text
    )
    assert "Clinician report (from the readings):" in answer.text
    assert answer.verified is True and answer.unverified == []  # the worker wrote no numbers
    [row] = [r for r in listed if r["agent"] == watch]
    assert (row["kind"], row["state"], row["domains"]) == ("sensor", "discovered", "health")


async def test_only_readings_heard_live_make_a_device_live_not_a_retained_last_value(
    mqtt, login, uid
):
    gone, alive = f"gone-{uid}", f"alive-{uid}"
    ts = int(time.time())
    live_device = mqtt_client(login(alive, "sensor"))
    async with mqtt_client(login(gone, "sensor")) as device, live_device:
        await device.publish(f"data/health/heart_rate/{gone}", readme_reading(gone, 70, ts),
                             qos=1, retain=True)  # fmt: skip
        planner = login(f"c-{uid}", "orchestrator")  # reads data/#, as an orchestrator does
        bus = Bus(settings=planner, client_id=f"c-{uid}", service=f"planner-{uid}")
        data = DataView(bus, domains=["health"])
        try:
            async with running(bus):
                await wait_for(lambda: data.listening)
                assert data.window(gone, "heart_rate") and data.live("health", within_s=60) == []
                await live_device.publish(f"data/health/heart_rate/{alive}",
                                     readme_reading(alive, 71, ts), qos=1)  # fmt: skip
                await wait_for(lambda: data.live("health", within_s=60) == [alive])
        finally:
            await device.publish(f"data/health/heart_rate/{gone}", b"", retain=True)
    # both have recent readings (so do other tests' retained devices), one was heard live
    assert {gone, alive} <= set(data.agents("health"))
    assert data.live("health", within_s=60) == [alive]
    assert data.live("environment", within_s=60) == []
