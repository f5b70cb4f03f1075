"""Sensor agents and the DataView: Data cooperation on a real broker, and bad data refused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time

import orjson
import pytest
from pydantic import ValidationError

from schemas import EmbeddingRecord, Error, KnowledgeAnswer, KnowledgeQuery, Reading
from services.core.bus import Bus, Request
from services.core.cms import CmsView
from services.core.topics import EMBEDDING, ERRORS, KNOWLEDGE, READING, SENSOR_ASK
from services.data.features import MODEL_DIMS, Sample, describe, describe_agent, embed
from services.data.streams import PROFILES, STREAMS
from services.data.view import DataView, embedding_problem, reading_problem
from services.sensor.__main__ import SensorSettings, build
from services.sensor.simulator import Simulator, event_intensity, expected
from tests.conftest import mqtt_client, running, wait_for
from tests.test_stack import online

HR = STREAMS[("health", "heart_rate")]
TEMP = STREAMS[("health", "body_temp")]
NIGHT = 1_700_000_000.0  # 22:13 UTC


def settings(**values: object) -> SensorSettings:
    return SensorSettings(_cli_parse_args=False, **values)  # type: ignore[call-arg]


def planner(login, uid: str):  # type: ignore[no-untyped-def]
    """The account of a test that plays the orchestrator: it reads data/# and asks sensors."""
    return login(f"c-{uid}", "orchestrator")


def reading(agent: str, stream: str = "heart_rate", **fields: object) -> dict[str, object]:
    spec = next(s for s in STREAMS.values() if s.name == stream)
    body = {"v": 1, "type": "reading", "agent": agent, "domain": spec.domain, "stream": stream}
    return body | {"value": 70.0, "unit": spec.unit, "ts": time.time()} | fields


# -- the registry, the sampling model and the features, without a broker ----------------------


def test_event_schedule_ramps_lasts_and_repeats():
    timing = {"after_s": 10.0, "for_s": 20.0, "every_s": 0.0, "ramp_s": 4.0}
    assert event_intensity(5, **timing) == 0.0
    assert event_intensity(12, **timing) == 0.5
    assert event_intensity(20, **timing) == 1.0
    assert event_intensity(31, **timing) == 0.0
    repeating = timing | {"every_s": 60.0}
    assert event_intensity(72, **repeating) == 0.5 and event_intensity(95, **repeating) == 0.0


@pytest.mark.parametrize("stream", list(STREAMS.values()), ids=lambda s: s.name)
def test_simulated_values_are_plausible_all_day(stream):
    simulator = Simulator([stream], seed=7)
    values = [simulator.sample(stream, NIGHT + i * 600, None, 0.0)[0] for i in range(144)]
    assert all(stream.in_bounds(v) for v in values)
    lo, hi = stream.typical
    assert lo <= sum(values) / len(values) <= hi
    assert len(set(values)) >= 3  # a rhythm and noise, not a constant


@pytest.mark.parametrize(
    ("event", "signature"),
    [("fever", ["body_temp"]), ("pollution", ["pm25"]), ("crowd", ["camera", "noise"])],
)
def test_an_event_raises_its_alert_at_any_hour_and_moves_its_streams(event, signature):
    day = [NIGHT + i * 600 for i in range(144)]
    for name in signature:
        stream = next(s for s in STREAMS.values() if s.name == name)
        assert all(stream.alert.hit(expected(stream, t, event, 1.0)) for t in day), name
        assert not stream.alert.hit(expected(stream, NIGHT, None, 0.0))
    moved = [s for s in STREAMS.values() if event in s.effects]
    assert all(abs(s.effects[event]) >= 2 * s.noise for s in moved)


def test_stats_v1_embedding_is_the_documented_formula():
    samples = [Sample(0.0, 60.0), Sample(1.0, 70.0), Sample(2.0, 110.0)]
    vector = embed(HR, samples)  # typical range 50-100, span 50; alert above 100
    assert vector is not None and len(vector) == MODEL_DIMS["stats-v1"] == 8
    std = (((60 - 80) ** 2 + (70 - 80) ** 2 + (110 - 80) ** 2) / 3) ** 0.5
    assert vector == pytest.approx(
        [30 / 50, std / 50, 10 / 50, 60 / 50, 60 / 50, 50 / 50, 1 / 3, 1.0], abs=1e-4
    )
    assert embed(HR, samples) == vector and embed(HR, [Sample(0.0, None, "x")]) is None


def test_description_has_numbers_trend_and_alert():
    samples = [Sample(float(t), 37.6 + 0.1 * t) for t in range(10)]
    assert (
        describe(TEMP, samples) == "body temperature 38.5 °C (mean 38.0, range 37.6-38.5, rising)"
    )
    line = describe_agent("watch-1", [(TEMP, samples), (HR, [Sample(9.0, 88.0)])])
    assert line.startswith("watch-1, last 9 s: body temperature 38.5 °C")
    assert "heart rate 88 bpm;" not in line and line.endswith(
        "Alerts: fever (body temperature 38.5 °C, above 38.0)."
    )


def test_reading_and_embedding_checks_beyond_the_schema():
    params = {"domain": "health", "stream": "heart_rate", "agent": "w"}
    ok = Reading.model_validate(reading("w"))
    now = time.time()
    assert reading_problem(ok, params, now) is None
    celsius = Reading.model_validate(reading("w", "body_temp", value=37.0, unit="degC"))
    assert reading_problem(celsius, params | {"stream": "body_temp"}, now) is None
    wrong_unit = ok.model_copy(update={"unit": "bps"})
    assert "expects unit 'bpm'" in reading_problem(wrong_unit, params, now)
    assert "physical bounds" in reading_problem(ok.model_copy(update={"value": 900.0}), params, now)
    assert "topic says agent" in reading_problem(ok, params | {"agent": "x"}, now)
    assert "in the future" in reading_problem(ok.model_copy(update={"ts": now + 3600}), params, now)
    record = EmbeddingRecord(
        agent="w",
        domain="health",
        stream="heart_rate",
        model="stats-v1",
        dim=3,
        vector=[0.0, 0.1, 0.2],
        window_start=1.0,
        window_end=2.0,
    )
    assert "declares 8 dimensions" in embedding_problem(record, params)


def test_settings_refuse_an_event_of_another_domain_and_unknown_streams():
    with pytest.raises(ValidationError, match="fever is for health"):
        settings(profile="city", event="fever")
    with pytest.raises(ValidationError, match="no streams"):
        settings(profile="wearable", streams=["pm25"])
    assert [s.name for s in settings(streams=["spo2"]).stream_specs()] == ["spo2"]


# -- on the broker ---------------------------------------------------------------------------


async def test_wearable_process_publishes_readings_embeddings_and_answers_with_a_fever(
    login, uid, spawn
):
    agent = f"wear-{uid}"
    bus = Bus(settings=planner(login, uid), client_id=f"c-{uid}", service=f"planner-{uid}")
    view, cms = DataView(bus, domains=["health"]), CmsView(bus)
    probe = Bus(settings=login(f"p-{uid}", "orchestrator"), client_id=f"p-{uid}", service="probe")
    seen: list[Request[Reading]] = []
    probe.listen(READING, seen.append, domain="health", agent=agent)
    async with running(bus), running(probe):
        flags = "--rate-hz 20 --window-s 1 --event fever --event-ramp-s 0"
        spawn("services.sensor", "--agent-id", agent, *flags.split())  # after we subscribed
        await wait_for(online(cms, agent))
        await wait_for(lambda: view.counters.embeddings >= 6 and len(seen) >= 60, timeout=60)
        record = view.embedding(agent, "heart_rate")
        answer = await bus.request(
            SENSOR_ASK.format(domain="health", agent=agent),
            KnowledgeQuery(
                request_id=f"k-{uid}",
                domain="health",
                question="How is the wearer?",
                asker=f"c-{uid}",
                deadline=time.time() + 30,
            ),
            deadline=time.time() + 30,
        )
    card = cms.agent(agent).card
    names = PROFILES["wearable"][1]
    assert card.kind == "sensor" and card.domains == ["health"]
    assert card.streams == [
        *(READING.format(domain="health", stream=n, agent=agent) for n in names),
        *(EMBEDDING.format(domain="health", stream=n, agent=agent) for n in names),
    ]
    for request in seen:
        body, stream = request.body, STREAMS[("health", request.body.stream)]
        assert request.topic == READING.format(domain="health", stream=body.stream, agent=agent)
        assert body.unit == stream.unit and stream.in_bounds(body.value)
    temps = [r.body.value for r in seen if r.body.stream == "body_temp"]
    rates = [r.body.value for r in seen if r.body.stream == "heart_rate"]
    assert temps and min(temps) > 38.0 and 70 < sum(rates) / len(rates) < 130
    assert isinstance(record, EmbeddingRecord) and record.model == "stats-v1"
    assert record.dim == len(record.vector) == 8 and record.agent == agent
    assert view.counters.embeddings_reused == 1 and view.counters.embeddings_computed == 0
    c = view.counters
    assert c.refused == 0 and c.bytes_raw_equivalent > 3 * c.bytes_received_embeddings > 0
    assert isinstance(answer, KnowledgeAnswer) and answer.agent == agent
    assert re.search(r"body temperature 3[89]\.\d °C \(mean 3[89]\.\d", answer.answer)
    assert "Alerts: " in answer.answer and "fever (body temperature" in answer.answer
    assert "fever (body temperature" in view.summary("health")


async def test_last_value_is_retained_for_a_late_subscriber(login, uid, spawn):
    agent = f"wear-{uid}"
    spawn("services.sensor", "--agent-id", agent, "--streams", "spo2", "--rate-hz", "5")
    bus = Bus(settings=planner(login, uid), client_id=f"c-{uid}", service=f"planner-{uid}")
    view = DataView(bus, domains=["health"])
    async with running(bus):
        await wait_for(lambda: agent in view.agents("health"))
    late_settings = login(f"late-{uid}", "orchestrator")
    late = Bus(settings=late_settings, client_id=f"late-{uid}", service=f"late-{uid}")
    late_view = DataView(late, domains=["health"])
    async with running(late):
        await late.barrier()  # every retained message is in once the barrier returns
        assert agent in late_view.agents("health")
        assert re.search(r"SpO2 \d+ %", late_view.summary("health", agents=[agent]))


async def test_city_sensor_shows_a_crowd_in_values_summary_and_answer(login, uid):
    agent = f"city-{uid}"
    config = settings(
        agent_id=agent, profile="city", rate_hz=20, window_s=1, event="crowd", event_ramp_s=0
    )
    sensor_bus = Bus(settings=login(agent, "sensor"), client_id=agent, service="sensor")
    sensor = build(config, sensor_bus)
    bus = Bus(settings=planner(login, uid), client_id=f"c-{uid}", service=f"planner-{uid}")
    view = DataView(bus, domains=["environment"])
    async with running(sensor_bus), running(bus):
        loop = asyncio.create_task(sensor.run())
        try:
            await wait_for(lambda: len(view.window(agent, "noise")) >= 10)
            answer = await bus.request(
                SENSOR_ASK.format(domain="environment", agent=agent),
                KnowledgeQuery(
                    request_id=f"k-{uid}",
                    domain="environment",
                    question="Crowds?",
                    asker=f"c-{uid}",
                    deadline=time.time() + 30,
                ),
                deadline=time.time() + 30,
            )
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
    summary = view.summary("environment", agents=[agent])
    assert re.search(r'caption "a crowd of ~\d+ people gathering near ', summary)
    assert "crowd (people in view" in summary and "µg/m³" in summary
    assert answer.agent == agent and "crowd (people in view" in answer.answer


async def test_view_computes_a_window_embedding_when_none_was_published(login, uid):
    agent = f"dev-{uid}"
    device = Bus(settings=login(agent, "sensor"), client_id=agent, service="sensor")
    bus = Bus(settings=planner(login, uid), client_id=f"c-{uid}", service=f"planner-{uid}")
    view = DataView(bus, domains=["health"])
    topic = READING.format(domain="health", stream="heart_rate", agent=agent)
    t0 = time.time() - 10
    async with running(bus), running(device):
        for i, value in enumerate((60.0, 70.0, 110.0)):
            body = Reading.model_validate(reading(agent, value=value, ts=t0 + i))
            await device.publish(topic, body)
        await wait_for(lambda: len(view.window(agent, "heart_rate")) == 3)
    assert view.last_seen(agent) >= t0 + 10 and view.last_seen(f"none-{uid}") is None
    record = view.embedding(agent, "heart_rate")
    expected_vector = embed(HR, [Sample(t0, 60.0), Sample(t0 + 1, 70.0), Sample(t0 + 2, 110.0)])
    assert record is not None and record.vector == expected_vector
    assert view.counters.embeddings_computed == 1 and view.counters.embeddings_reused == 0
    assert view.embedding(f"none-{uid}", "heart_rate") is None


def _embedding(agent: str, dim: int) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "type": "embedding_record",
            "agent": agent,
            "domain": "health",
            "stream": "heart_rate",
            "model": "stats-v1",
            "dim": dim,
            "vector": [0.5] * dim,
            "window_start": time.time() - 30,
            "window_end": time.time(),
        }
    )


BAD_INPUT = {
    "nan_value": (lambda a: orjson.dumps(reading(a, value="NaN")), "bad_schema", "finite"),
    "nan_token": (lambda a: orjson.dumps(reading(a)).replace(b"70.0", b"NaN"), "bad_json",
                  "NaN and Infinity are not JSON numbers: a reading must be finite"),
    "wrong_unit": (lambda a: orjson.dumps(reading(a, unit="bps")), "bad_request",
                   "stream health/heart_rate expects unit 'bpm'"),
    "out_of_bounds": (lambda a: orjson.dumps(reading(a, value=900.0)), "bad_request",
                      "outside the physical bounds 20-250"),
    "wrong_dim": (lambda a: _embedding(a, 16), "bad_request",
                  "model stats-v1 declares 8 dimensions, the record has dim 16"),
    "malformed_json": (lambda a: b'{"v": 1, "type": "reading", oops', "bad_json", "not JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
async def test_bad_data_gets_an_error_and_the_view_keeps_taking_readings(login, uid, case):
    make, code, words = BAD_INPUT[case]
    agent, service = f"dev-{uid}", f"planner-{uid}"
    bus = Bus(settings=planner(login, uid), client_id=f"c-{uid}", service=service)
    view = DataView(bus, domains=["health"])
    template = EMBEDDING if case == "wrong_dim" else READING
    bad_topic = template.format(domain="health", stream="heart_rate", agent=agent)
    good_topic = READING.format(domain="health", stream="heart_rate", agent=agent)
    operator = login(f"operator-{uid}", "operator")  # who reads errors/#
    async with (
        running(bus),
        mqtt_client(login(agent, "sensor")) as device,
        mqtt_client(operator) as errors,
    ):
        await errors.subscribe(ERRORS.format(service=service), qos=1)
        await device.publish(bad_topic, make(agent), qos=1)
        async with asyncio.timeout(30):
            message = await anext(aiter(errors.messages))
        await device.publish(good_topic, orjson.dumps(reading(agent, value=64.0)), qos=1)
        await wait_for(lambda: len(view.window(agent, "heart_rate")) == 1)
    error = Error.model_validate_json(message.payload)
    assert (error.code, error.service, error.topic) == (code, service, bad_topic)
    assert words in error.message
    assert case == "nan_token" or "NaN and Infinity" not in error.message
    assert view.counters.refused == bus.errors_sent == 1 and view.counters.embeddings == 0
    assert "heart rate 64 bpm" in view.summary("health", agents=[agent])


async def test_a_plain_mosquitto_pub_reading_is_taken(login, broker, uid, tmp_path):
    agent = f"watch-{uid}"
    device = login(agent, "sensor")  # its options (the account) as the README tells a device
    (tmp_path / "mosquitto_pub").write_text(f"-u {agent}\n-P {device.secret()}\n")
    bus = Bus(settings=planner(login, uid), client_id=f"c-{uid}", service=f"planner-{uid}")
    view = DataView(bus)
    ts = int(time.time())
    lines = [  # literal topics: what the README tells a device to use
        (
            "data/health/heart_rate/" + agent,
            f'{{"v":1,"type":"reading","agent":"{agent}","domain":"health",'
            f'"stream":"heart_rate","value":72,"unit":"bpm","ts":{ts}}}',
        ),
        (
            "data/environment/pm25/" + agent,
            f'{{"v":1,"type":"reading","agent":"{agent}","domain":"environment",'
            f'"stream":"pm25","value":41.5,"unit":"ug/m3","ts":{ts}}}',
        ),
    ]
    async with running(bus):
        for topic, message in lines:
            subprocess.run(
                [
                    "mosquitto_pub",
                    "-V",
                    "mqttv5",
                    "-h",
                    broker.host,
                    "-p",
                    str(broker.port),
                    "-t",
                    topic,
                    "-r",
                    "-m",
                    message,
                ],
                check=True,
                timeout=10,
                env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
            )
        await wait_for(lambda: len(view.window(agent, "pm25")) == 1)
        assert [s.value for s in view.window(agent, "heart_rate")] == [72.0]
    assert view.counters.refused == 0
    assert view.summary("health", agents=[agent]) == f"{agent}: heart rate 72 bpm. No alerts."
    assert "PM2.5 41.5 µg/m³. Alerts: unhealthy air" in view.summary("environment", agents=[agent])


async def test_a_sensor_leaves_the_experts_questions_to_the_experts(login, uid):
    agent = f"quiet-{uid}"
    config = settings(agent_id=agent, profile="city", streams=["noise"])
    sensor_bus = Bus(settings=login(agent, "sensor"), client_id=agent, service="sensor")
    build(config, sensor_bus)
    received: list[str] = []
    dispatch = sensor_bus._dispatch

    def spy(topic: str, payload: bytes, props: object) -> None:  # all the sensor receives
        received.append(topic)
        dispatch(topic, payload, props)

    sensor_bus._dispatch = spy  # type: ignore[method-assign]
    bus = Bus(settings=planner(login, uid), client_id=f"c-{uid}", service=f"planner-{uid}")

    def question(n: int) -> KnowledgeQuery:
        return KnowledgeQuery(
            request_id=f"k{n}-{uid}",
            domain="environment",
            question="Anyone?",
            asker=f"c-{uid}",
            deadline=time.time() + 30,
        )

    experts = KNOWLEDGE.format(domain="environment")
    own = SENSOR_ASK.format(domain="environment", agent=agent)
    async with running(sensor_bus), running(bus):
        await bus.publish(experts, question(1))
        await bus.barrier()  # the broker has routed the question to whoever subscribed...
        await sensor_bus.barrier()  # ...and the sensor has taken in all it was sent before
        assert experts not in received
        answer = await bus.request(own, question(2), deadline=time.time() + 30)
    assert own in received and experts not in received
    assert isinstance(answer, KnowledgeAnswer) and answer.agent == agent
