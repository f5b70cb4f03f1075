"""The OpenAI-compatible gateway against a real stack: the official `openai` client and curl.

Gateway, orchestrator, classifier and an emulated worker run as processes on the test broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import ConfigError
from services.core.topics import TENANT
from services.gateway.keys import KeyRing, ensure_key_file, read_key_file
from tests.broker import ROOT
from tests.conftest import running, wait_for
from tests.gateway_stack import start_gateway, wait_ready, write_key_file
from tools.common.broker import free_port

MINILM = "all-MiniLM-L6-v2"


@pytest.fixture
def stack(spawn, uid, tmp_path, minilm_dir):  # type: ignore[no-untyped-def]
    """orchestrator + classifier + emulated worker + gateway (two tenants), all online."""
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}", "--metrics-interval-s", "0.5")
    spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
    spawn("services.worker", "--agent-id", f"w-{uid}", "--tokens-per-s", "200",
          "--metrics-interval-s", "0.5")  # fmt: skip
    gateway = start_gateway(spawn, uid, tmp_path, tenants=("main", "capped"))
    wait_ready(gateway, orchestrator=1, worker=1, classifier=1)
    return gateway


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of one curl call."""
    out = subprocess.run(
        ["curl", "-s", "-S", "-i", "--max-time", "30", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def test_openai_client_chats_plain_and_streaming_with_provenance(stack, uid):
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.key, max_retries=0)
    models = {m.id: m for m in (await client.models.list()).data}
    assert {"edgecollab", "emulated", MINILM} <= set(models)
    assert f"w-{uid}" in [a["agent"] for a in models["emulated"].model_extra["agents"]]

    raw = await client.chat.completions.with_raw_response.create(
        model="edgecollab",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=6,
    )
    completion = raw.parse()
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason == "length"
    assert completion.model == "emulated" and completion.usage.completion_tokens == 6
    provenance = completion.model_extra["edgecollab"]
    assert provenance["outcome"] == "edge"
    by_name = {s["name"]: s for s in provenance["steps"]}
    assert by_name["classify"]["agent"] == f"cls-{uid}"
    assert by_name["answer"]["agent"] == f"w-{uid}" and by_name["answer"]["where"] == "edge"
    assert raw.headers["x-edgecollab-outcome"] == "edge"
    assert f"answer=w-{uid}(edge,ok)" in raw.headers["x-edgecollab-provenance"]

    stream = await client.chat.completions.create(
        model="edgecollab",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about edge computing."},
        ],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    pieces = [p for p in pieces if p]
    assert len(pieces) >= 2, "the tokens arrive as several chunks, not one"
    streamed = "".join(pieces).split()
    assert len(streamed) == 12 and streamed[:6] == text.split()  # the emulated words, in order
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert final.choices[0].finish_reason == "length"
    assert final.model_extra["edgecollab"]["outcome"] == "edge"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


async def test_openai_client_embeds_with_minilm(stack):
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.key, max_retries=0)
    texts = ["the air in the park is clean", "air quality in the park is good", "def f(x):"]
    result = await client.embeddings.create(model=MINILM, input=texts)  # base64 on the wire
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (3, 384) and result.usage.prompt_tokens > 0
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # similar texts are near
    floats = await client.embeddings.create(model=MINILM, input=texts[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vectors[0], atol=1e-6)


async def test_openai_client_errors_are_typed(stack):
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.key, max_retries=0)
    hello = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-9", messages=hello)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        await client.chat.completions.create(
            model="edgecollab", messages=[{"role": "user", "content": "x" * 9000}]
        )
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="edgecollab", messages=hello, n=2)
    stranger = openai.AsyncOpenAI(base_url=stack.base_url, api_key="x" * 20, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        await stranger.models.list()
    assert refused.value.code == "invalid_api_key"


async def test_curl_routes_error_codes_and_metrics(stack, uid):
    url, auth = stack.url, f"Authorization: Bearer {stack.key}"
    status, _, body = curl(url + "/health")
    assert status == 200 and json.loads(body)["online"]["orchestrator"] >= 1
    status, _, body = curl(url + "/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "no_key"
    status, _, body = curl(url + "/v1/models", "-H", "Authorization: Bearer nope-nope-nope-nope")
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    status, _, body = curl(url + "/v1/chat/completions", "-H", auth, "-d", "{not json")
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_json"
    status, _, body = curl(url + "/v1/chat/completions", "-H", auth, "-d", '{"model": "x"}')
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "messages"
    assert error["type"] == "invalid_request_error"
    chat = {
        "model": "edgecollab",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    status, headers, body = curl(
        "-N", url + "/v1/chat/completions", "-H", auth, "-d", json.dumps(chat)
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"
    status, headers, body = curl(url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'edgecollab_gateway_requests_total{outcome="edge",route="chat",status="200"}' in body
    assert f'edgecollab_agent_online{{agent="w-{uid}",kind="worker"}} 1.0' in body
    assert 'edgecollab_gateway_request_duration_seconds_bucket{le="+Inf",route="chat"}' in body
    status, _, _ = curl("-X", "DELETE", url + "/v1/models", "-H", auth)
    assert status == 405


async def test_a_tenant_over_its_usage_limit_gets_429(stack, login, uid):
    """The orchestrators count every tenant's tokens (an API key's tenant, named by the gateway's
    account); a query that would pass the limit gets 429 before any generation."""
    capped = next(k for k, t in stack.keys.items() if t == f"capped-{uid}")
    operator = f"operator-{uid}"  # cms/tenants/ is the operators'
    bus = Bus(settings=login(operator, "operator"), client_id=operator, service="test")
    view = CmsView(bus)
    async with running(bus):
        from services.core import cms

        await cms.put(bus, TENANT.format(tenant=f"capped-{uid}", name="usage_limit"), 1, version=1)
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=capped, max_retries=0)
        hello = [{"role": "user", "content": "hello"}]
        refused = None
        async with asyncio.timeout(30):
            while refused is None:  # until the orchestrator's view has the limit
                try:
                    await client.chat.completions.create(
                        model="edgecollab", messages=hello, max_tokens=2
                    )
                except openai.RateLimitError as exc:
                    refused = exc
        assert refused.code == "insufficient_quota" and f"capped-{uid}" in refused.message
        other = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.key, max_retries=0)
        ok = await other.chat.completions.create(model="edgecollab", messages=hello, max_tokens=2)
        assert ok.choices[0].message.content
        used = f"metrics/orch-{uid}/tenants"  # what each tenant used this period

        def tokens(tenant: str) -> int:
            entry = view.get(used)
            return entry.value.get(tenant, {}).get("tokens", 0) if entry else 0

        await wait_for(lambda: tokens(f"main-{uid}") >= 1)


async def test_no_orchestrator_no_worker_full_edge_and_deadline_map_to_503_429_504(
    spawn, uid, tmp_path, mqtt, login
):
    gateway = start_gateway(spawn, uid, tmp_path)
    wait_ready(gateway)
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=gateway.key, max_retries=0)
    hello = [{"role": "user", "content": "hello"}]

    with pytest.raises(openai.InternalServerError) as no_orchestrator:
        await client.chat.completions.create(model="edgecollab", messages=hello)
    assert no_orchestrator.value.status_code == 503
    with pytest.raises(openai.InternalServerError) as no_embedder:
        await client.embeddings.create(model=MINILM, input="hi")
    assert no_embedder.value.status_code == 503  # no classifier online: nobody embeds

    spawn("services.orchestrator", "--agent-id", f"orch-{uid}", "--policy", "load_aware")
    wait_ready(gateway, orchestrator=1)
    with pytest.raises(openai.InternalServerError) as no_worker:
        await client.chat.completions.create(model="edgecollab", messages=hello)
    assert no_worker.value.status_code == 503 and no_worker.value.code == "no_agent"

    worker = f"w-{uid}"
    spawn("services.worker", "--agent-id", worker, "--tokens-per-s", "10", "--concurrency", "1")
    wait_ready(gateway, orchestrator=1, worker=1)
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        await wait_for(lambda: view.online(worker))
        busy = asyncio.create_task(
            client.chat.completions.create(model="edgecollab", messages=hello, max_tokens=25)
        )
        await wait_for(lambda: view.statuses[worker].active == 1)
        with pytest.raises(openai.RateLimitError) as full:
            await client.chat.completions.create(model="edgecollab", messages=hello)
        assert full.value.status_code == 429 and full.value.code == "edge_full"
        assert (await busy).choices[0].message.content
    status, _, body = curl(
        gateway.url + "/v1/chat/completions",
        "-H",
        f"Authorization: Bearer {gateway.key}",
        "-d",
        json.dumps({"model": "edgecollab", "messages": hello, "stream": True, "max_tokens": 3}),
    )
    assert status == 200 and "data: [DONE]" in body  # streamed, once the worker is free

    with pytest.raises(openai.APIStatusError) as late:
        await client.chat.completions.create(
            model="edgecollab", messages=hello, max_tokens=100, extra_body={"timeout_s": 1}
        )
    assert late.value.status_code == 504


async def test_per_agent_metrics_reach_the_cms_metrics_and_dashboard(stack, mqtt, login, uid):
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.key, max_retries=0)
    for _ in range(2):
        await client.chat.completions.create(
            model="edgecollab", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    tokens, avg = (
        f"metrics/w-{uid}/{name}" for name in ("tokens_used_total", "inference_time_avg")
    )
    async with running(bus):
        await wait_for(lambda: view.get(tokens) is not None and view.get(tokens).value == 8)
        assert 0 < view.get(avg).value < 10
        assert view.get(tokens).origin == f"w-{uid}"  # each worker writes its own
    lines = (  # the worker's and the orchestrator's metrics come apart, each on its own timer
        f'edgecollab_agent_tokens_used_total{{agent="w-{uid}"}} 8.0',
        f'edgecollab_orchestrator_requests_total{{orchestrator="orch-{uid}",outcome="edge"}}',
    )
    scraped = ""
    async with asyncio.timeout(30):  # until the gateway's own view has them too
        while not all(line in scraped for line in lines):
            scraped = httpx.get(stack.url + "/metrics", timeout=10).text
            await asyncio.sleep(0.05)
    assert f'edgecollab_agent_inference_time_avg_seconds{{agent="w-{uid}"}}' in scraped
    state = httpx.get(stack.url + "/dashboard/state", timeout=10).json()
    assert state["agent_metrics"][f"w-{uid}"]["tokens_used_total"] == 8


def test_key_file_is_made_once_with_mode_0600_and_read_back(tmp_path):
    path = tmp_path / "state" / "gateway.key"
    key = ensure_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_key_file(path) == key and read_key_file(path) == {key: "default"}
    assert KeyRing(read_key_file(path)).tenant(key) == "default"
    assert KeyRing(read_key_file(path)).tenant(key + "x") is None
    path.write_text("a-key-of-enough-length tenant extra\n")
    with pytest.raises(ConfigError, match=r"gateway\.key:1"):
        read_key_file(path)
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="16-256"):
        read_key_file(path)


def test_gateway_refuses_a_taken_port_in_one_line(mqtt, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "EDGECOLLAB_MQTT_PORT": str(mqtt.port)}
        env["EDGECOLLAB_STATE_DIR"] = str(tmp_path)
        result = subprocess.run(
            [sys.executable, "-m", "services.gateway", "--port", str(port)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"gateway: cannot listen on 127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]


def test_gateway_answers_503_while_its_broker_is_unreachable(tmp_path):
    port = free_port()
    env = {**os.environ, "EDGECOLLAB_MQTT_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "gateway.log").open("wb")
    keys = write_key_file(tmp_path / "keys", {"a-key-for-the-test-0123": "main"})
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.gateway",
            "--port",
            str(port),
            "--api-key-file",
            str(keys),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, status = time.monotonic() + 60, None
        while status is None and time.monotonic() < deadline:
            try:
                status, body = curl(f"http://127.0.0.1:{port}/health")[::2]
            except subprocess.CalledProcessError:  # not listening yet
                time.sleep(0.1)
        assert status == 503 and json.loads(body)["error"]["code"] == "no_broker"
    finally:
        gateway.terminate()
        gateway.wait(30)
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


def test_up_prints_the_gateway_url_and_key_and_keeps_the_key_0600(mqtt, broker, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "EDGECOLLAB_STATE_DIR": str(broker.workdir),  # the session broker's accounts
        "EDGECOLLAB_GATEWAY_API_KEY_FILE": str(tmp_path / "gateway.key"),
        "EDGECOLLAB_GATEWAY_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "up",
            "--only",
            "gateway",
            "--broker",
            f"{mqtt.host}:{mqtt.port}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)
    reader.start()
    try:
        key_file = tmp_path / "gateway.key"
        deadline = time.monotonic() + 60
        while not any("listening" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        key = key_file.read_text().split()[0]
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        banner = [line for line in lines if line.startswith("up:")]
        assert f"up: HTTP API http://127.0.0.1:{port}/v1" in "\n".join(banner)
        assert any(key in line and str(key_file) in line for line in banner)
        models = httpx.get(
            f"http://127.0.0.1:{port}/v1/models",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert models.status_code == 200
    finally:
        up.terminate()
        up.wait(30)
        reader.join(10)
    logged = [line for line in lines if not line.startswith("up:")]
    assert not any(key in line for line in logged), "the key must never be logged"
    assert not any("Traceback" in line for line in lines)
