"""The SLM worker with the onnx backend (the tiny random model) on a real broker."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time

import orjson
import pytest

from schemas import Error, KnowledgeAnswer, KnowledgeQuery, Resume, Task, TaskResult, TokenChunk
from services.core import cms
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import RemoteError
from services.core.topics import ERRORS, KNOWLEDGE, MODEL_DETAIL, STREAM, TASKS
from tests.broker import ROOT
from tests.conftest import mqtt_client, running, wait_for
from tests.test_stack import online


def model_name(folder) -> str:  # type: ignore[no-untyped-def]
    return json.loads((folder / "model.json").read_text())["name"]


def task(uid: str, *, prompt: str = "Hello there", max_tokens: int = 8, **extra) -> Task:  # type: ignore[no-untyped-def]
    return Task(
        task_id=f"t{time.time_ns()}",
        request_id=f"r{uid}{time.time_ns()}",
        prompt=prompt,
        max_tokens=max_tokens,
        deadline=time.time() + 20,
        **extra,
    )


async def start_worker(spawn, login, uid, model_dir, *args):  # type: ignore[no-untyped-def]
    spawn(
        "services.worker",
        "--agent-id",
        f"w-{uid}",
        "--backend",
        "onnx",
        "--model-dir",
        str(model_dir),
        "--threads",
        "1",
        *args,
    )
    # the test plays the orchestrator: it sends the worker tasks
    bus = Bus(settings=login(f"c-{uid}", "orchestrator"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    return bus, view


async def generate(bus: Bus, uid: str, **kwargs) -> TaskResult:  # type: ignore[no-untyped-def]
    reply = await bus.request(
        TASKS.format(agent=f"w-{uid}"),
        task(uid, **kwargs),
        deadline=time.time() + 20,
    )
    assert isinstance(reply, TaskResult)
    return reply


async def test_onnx_worker_serves_streams_and_advertises_its_model(
    login, uid, spawn, tiny_model_dir
):
    bus, view = await start_worker(spawn, login, uid, tiny_model_dir)
    chunks: list[TokenChunk] = []
    async with running(bus):
        await wait_for(online(view, f"w-{uid}"), timeout=60)
        first = task(uid, max_tokens=12, stream=True, client=f"c-{uid}")
        await bus.follow(
            STREAM, lambda r: chunks.append(r.body), client=f"c-{uid}", request=first.request_id
        )
        result = await bus.request(TASKS.format(agent=f"w-{uid}"), first, deadline=first.deadline)
        assert isinstance(result, TaskResult)
        # a second worker takes over where the first stopped: after its first two chunks
        await bus.barrier()
        heard = len(chunks)
        sent = Resume(text="".join(c.text for c in chunks[:2]), seq=2)
        taken_over = first.model_copy(update={"task_id": f"{first.task_id}.2", "attempt": 2,
                                             "resume": sent})  # fmt: skip
        resumed = await bus.request(
            TASKS.format(agent=f"w-{uid}"), taken_over, deadline=first.deadline
        )
        await bus.barrier()
        card = view.agent(f"w-{uid}").card
        name = model_name(tiny_model_dir)
        arch = view.get(MODEL_DETAIL.format(model=name, field="architecture"))
    assert isinstance(result, TaskResult) and result.output_tokens >= 1
    assert result.prompt_tokens > 0 and result.decode_tok_s > 0 and result.prefill_ms > 0
    assert "".join(c.text for c in chunks[:heard]) == result.text
    assert isinstance(resumed, TaskResult) and resumed.text.startswith(sent.text)
    continued = chunks[heard:]
    assert {c.attempt for c in continued} == {2}
    assert [c.seq for c in continued] == list(range(2, 2 + len(continued)))
    assert sent.text + "".join(c.text for c in continued) == resumed.text
    assert card.backend == "onnx" and card.model.name == name and card.tokens_per_s > 0
    assert arch is not None and arch.value == card.model.architecture


async def test_cms_parameters_apply_to_the_next_request(login, uid, spawn, tiny_model_dir):
    bus, view = await start_worker(spawn, login, uid, tiny_model_dir)
    name = model_name(tiny_model_dir)
    operator = f"operator-{uid}"  # who may write cms/parameters
    ops = Bus(settings=login(operator, "operator"), client_id=operator, service="cli")
    reader = login(f"operator-errors-{uid}", "operator")  # who reads errors/#
    async with running(bus), running(ops), mqtt_client(reader) as sub:
        await sub.subscribe(ERRORS.format(service="worker"), qos=1)
        await wait_for(online(view, f"w-{uid}"), timeout=60)

        async def refusal() -> Error:
            async with asyncio.timeout(30):
                return Error.model_validate_json((await anext(sub.messages)).payload)

        greedy = await generate(bus, uid, max_tokens=16)
        assert (await generate(bus, uid, max_tokens=16)).text == greedy.text
        try:
            await cms.put(ops, f"parameters/{name}/temperature", 1.0, version=1)
            await cms.put(ops, f"parameters/{name}/seed", 7, version=1)
            await cms.put(ops, f"parameters/{name}/warmth", 1, version=1)
            # the worker's view takes the keys in order: refusing the last, it has the others
            error = await refusal()
            sampled = await generate(bus, uid, max_tokens=16)
        finally:
            for key in ("temperature", "seed", "warmth"):
                await cms.delete(ops, f"parameters/{name}/{key}")
        await cms.put(ops, f"parameters/{name}/marker", 1, version=1)  # refused after the deletes
        marker = await refusal()
        await cms.delete(ops, f"parameters/{name}/marker")
        again = await generate(bus, uid, max_tokens=16)
    assert sampled.text != greedy.text and again.text == greedy.text
    assert error.code == "bad_request" and "unknown parameter 'warmth'" in error.message
    assert "unknown parameter 'marker'" in marker.message


async def test_the_worker_publishes_its_models_defaults_and_leaves_parameters_to_operators(
    login, uid, spawn, tiny_model_dir
):
    name = model_name(tiny_model_dir)
    key, defaults = f"cms/parameters/{name}/repetition_penalty", f"cms/slm/{name}/defaults"
    operator = f"operator-{uid}"
    bus = Bus(settings=login(operator, "operator"), client_id=operator, service="test")
    view = CmsView(bus)
    async with running(bus):
        await view.synced()
        before = view.get(key)
        await cms.put(bus, key, 1.05, version=before.version + 1 if before else 1)
        await wait_for(lambda: (e := view.get(key)) is not None and e.value == 1.05)
        spawn("services.worker", "--agent-id", f"w-{uid}", "--backend", "onnx",
              "--model-dir", str(tiny_model_dir), "--threads", "1")  # fmt: skip
        await wait_for(lambda: (e := view.get(defaults)) is not None and e.origin == f"w-{uid}", 60)
        await wait_for(online(view, f"w-{uid}"), 60)  # its card comes after its defaults
        published, entry = view.get(defaults), view.get(key)
        await cms.delete(bus, key)
    assert published is not None and published.value == {"repetition_penalty": 1.15}  # unmeasured
    assert entry is not None and entry.value == 1.05 and entry.origin == operator


async def test_bad_requests_get_clear_errors_and_worker_goes_on(login, uid, spawn, tiny_model_dir):
    bus, view = await start_worker(spawn, login, uid, tiny_model_dir)
    topic = TASKS.format(agent=f"w-{uid}")
    good = orjson.loads(task(uid).model_dump_json())
    cases = {
        "empty prompt": ({**good, "prompt": "   "}, "bad_request", "empty"),
        "prompt over the context": ({**good, "prompt": "word " * 2000}, "bad_request", "context"),
        "max_tokens 0": ({**good, "max_tokens": 0}, "bad_schema", "max_tokens"),
        "max_tokens 10**9": ({**good, "max_tokens": 10**9}, "bad_schema", "max_tokens"),
        "unknown parameter": ({**good, "sampling": {"warmth": 1}}, "bad_schema", "warmth"),
    }
    async with running(bus):
        await wait_for(online(view, f"w-{uid}"), timeout=60)
        for name, (payload, code, words) in cases.items():
            with pytest.raises(RemoteError) as raised:
                await bus.request_raw(topic, orjson.dumps(payload), deadline=time.time() + 20)
            assert raised.value.error.code == code, name
            assert words in raised.value.error.message, (name, raised.value.error.message)
        assert (await generate(bus, uid)).output_tokens >= 1


async def test_worker_answers_its_knowledge_domain(login, uid, spawn, tiny_model_dir):
    domain = f"d{uid}"
    bus, view = await start_worker(spawn, login, uid, tiny_model_dir, "--domains", f'["{domain}"]')
    async with running(bus):
        await wait_for(online(view, f"w-{uid}"), timeout=60)
        query = KnowledgeQuery(
            request_id=f"k{uid}",
            domain=domain,
            question="What is rest?",
            asker=f"c-{uid}",
            max_tokens=6,
            deadline=time.time() + 20,
        )
        answer = await bus.request(
            KNOWLEDGE.format(domain=domain),
            query,
            deadline=query.deadline,
        )
    assert isinstance(answer, KnowledgeAnswer) and answer.agent == f"w-{uid}"
    assert answer.domain == domain and answer.output_tokens >= 1


@pytest.mark.parametrize("damage", ["missing", "no model.onnx", "corrupt model.json"])
def test_a_bad_model_folder_is_a_clear_startup_failure(tmp_path, tiny_model_dir, damage):
    folder = tmp_path / "model"
    if damage != "missing":
        shutil.copytree(tiny_model_dir, folder)
    if damage == "no model.onnx":
        (folder / "model.onnx").unlink()
    if damage == "corrupt model.json":
        (folder / "model.json").write_text("{not json")
    out = subprocess.run(
        [sys.executable, "-m", "services.worker", "--backend", "onnx", "--model-dir", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    named = {
        "missing": str(folder),
        "no model.onnx": "model.onnx",
        "corrupt model.json": "model.json",
    }[damage]
    assert out.stderr.strip().splitlines()[-1].startswith("worker: ")
    assert named in out.stderr


async def test_requests_share_the_model_concurrently(login, uid, spawn, tiny_model_dir):
    bus, view = await start_worker(spawn, login, uid, tiny_model_dir, "--concurrency", "4")
    async with running(bus):
        await wait_for(online(view, f"w-{uid}"), timeout=60)
        alone = await generate(bus, uid, prompt="one two three", max_tokens=10)
        together = await asyncio.gather(
            *(
                generate(bus, uid, prompt=p, max_tokens=10)
                for p in ("one two three", "four five", "six", "seven eight nine ten")
            )
        )
    assert together[0].text == alone.text  # batching does not change a greedy answer
    assert all(r.output_tokens >= 1 for r in together)


@pytest.mark.parametrize("rate", [200.0, 1e6])
async def test_the_emulated_device_is_never_faster_than_its_rate(uid, rate):
    from schemas import SamplingOptions
    from services.worker.emulated import EmulatedBackend

    backend = EmulatedBackend(tokens_per_s=rate, concurrency=1)
    pieces: list[str] = []

    async def emit(text: str) -> None:
        pieces.append(text)

    started = time.perf_counter()
    text, result = await backend.generate(task(uid, max_tokens=10), SamplingOptions(), emit)
    elapsed = time.perf_counter() - started
    assert result.output_tokens == 10 and result.finish_reason == "length"
    assert len("".join(pieces).split()) == 10 == len(text.split())
    # waits below the loop's 1 ms timer resolution are counted, not slept: at most that early
    assert elapsed >= 10 / rate - 0.001
