"""cms/configs/... read live by real services on a real broker: the next request follows a
change, a bad value is refused on errors/<service> and the old one kept."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from schemas import Error
from services.core import cms
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.settings import MqttSettings
from services.core.topics import ERRORS, METRIC, SITE_CONFIG
from tests.conftest import running, wait_for
from tests.test_stack import ask, online
from tests.test_worker import generate
from tools.bench.fake_cloud import FakeCloud


def tiny_named(tiny_model_dir: Path, folder: Path, name: str) -> Path:
    """The tiny model under a name of its own (its CMS keys then belong to this test alone)."""
    shutil.copytree(tiny_model_dir, folder)
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**card, "name": name}))
    return folder


@asynccontextmanager
async def refusals(
    login: Callable[..., MqttSettings], uid: str, service: str
) -> AsyncIterator[tuple[Bus, CmsView]]:
    """A test client on the bus with its CMS view; `refused` takes the errors `service`
    reports about the keys of this test (those with `uid` in them, and the site's own keys;
    other tests' leftovers under cms/configs/ are reported too). An operator: configs are theirs."""
    operator = f"operator-{uid}"
    bus = Bus(settings=login(operator, "operator"), client_id=operator, service="test")
    found: asyncio.Queue[Error] = asyncio.Queue()

    def collect(request) -> None:  # type: ignore[no-untyped-def]
        topic = request.body.topic or ""
        if uid in topic or SITE_CONFIG.match(topic):
            found.put_nowait(request.body)

    bus.listen(ERRORS, collect, service=service)
    bus.found = found  # type: ignore[attr-defined]
    view = CmsView(bus)
    async with running(bus):
        yield bus, view


async def refused(bus: Bus, key: str) -> Error:
    async with asyncio.timeout(30):
        error: Error = await bus.found.get()  # type: ignore[attr-defined]
    assert error.topic == f"cms/{key}", error
    return error


async def test_worker_caps_max_tokens_live_and_publishes_its_metrics(
    mqtt, login, uid, spawn, tiny_model_dir, tmp_path
):
    model = f"tiny-{uid}"
    folder = tiny_named(tiny_model_dir, tmp_path / model, model)
    spawn("services.worker", "--agent-id", f"w-{uid}", "--backend", "onnx",
          "--model-dir", str(folder), "--threads", "1", "--metrics-interval-s", "0.5")  # fmt: skip
    key = f"configs/{model}/max_tokens"
    tasker = Bus(settings=login(f"o-{uid}", "orchestrator"), client_id=f"o-{uid}", service="t")
    async with refusals(login, uid, "worker") as (bus, view), running(tasker):
        await wait_for(online(view, f"w-{uid}"), timeout=60)
        free = await generate(tasker, uid, max_tokens=12, prompt="Tell me a story")
        await cms.put(bus, key, 2, version=1)
        capped = await generate(tasker, uid, max_tokens=12, prompt="Tell me a story")
        problems = []
        for n, bad in enumerate((True, "2", 10**9, 0, 2.5, [3]), start=2):
            await cms.put(bus, key, bad, version=n)
            problems.append((await refused(bus, key)).message)
        still = await generate(tasker, uid, max_tokens=12, prompt="Tell me a story")
        await cms.delete(bus, key)
        again = await generate(tasker, uid, max_tokens=12, prompt="Tell me a story")
        served = [free, capped, still, again]
        tokens = METRIC.format(scope=f"w-{uid}", name="tokens_used_total")
        average = METRIC.format(scope=f"w-{uid}", name="inference_time_avg")
        total = sum(r.output_tokens for r in served)
        await wait_for(lambda: (e := view.get(tokens)) is not None and e.value == total, 30)
        mean = view.get(average)
    assert free.output_tokens > 2 and capped.output_tokens <= 2 and still.output_tokens <= 2
    assert again.text == free.text  # the cap gone, the worker's own limit again
    assert all("keeping 2" in p and "max_tokens" in p for p in problems), problems
    assert "less than or equal to 4096" in problems[2] and "valid integer" in problems[1]
    assert mean is not None and mean.origin == f"w-{uid}"
    assert 0 < mean.value <= sum(r.ms for r in served) / 1000


async def test_orchestrator_takes_its_cloud_fallback_from_the_cms_live(mqtt, login, uid, spawn):
    with FakeCloud() as home, FakeCloud(api_key=None) as other:
        spawn("services.orchestrator", "--agent-id", f"orch-{uid}",
              "--cloud-url", home.url, "--cloud-api-key", home.api_key)  # fmt: skip
        async with refusals(login, uid, "orchestrator") as (bus, view):
            await wait_for(online(view, f"orch-{uid}"), timeout=60)
            keys = {name: f"configs/{name}" for name in ("fallback_endpoint", "fallback_model")}
            try:
                first = await ask(bus, f"no worker here {uid}")
                await cms.put(bus, keys["fallback_endpoint"], other.url, version=1)
                moved = await ask(bus)
                await cms.put(bus, keys["fallback_model"], "small-1", version=1)
                renamed = await ask(bus)
                problems = []
                for n, bad in enumerate(("ftp://x.example", 12, "not a url", ""), start=2):
                    await cms.put(bus, keys["fallback_endpoint"], bad, version=n)
                    problems.append((await refused(bus, keys["fallback_endpoint"])).message)
                kept = await ask(bus)
                await cms.put(bus, keys["fallback_endpoint"], None, version=9)
                none = await ask(bus)
            finally:
                for key in keys.values():
                    await cms.delete(bus, key)
            back = await ask(bus)
            wild = f"configs/*/max_tokens-{uid}"
            await cms.put(bus, wild, 5, version=1)
            wildcard = (await refused(bus, wild)).message
            await cms.delete(bus, wild)
            unknown_key = f"configs/m-{uid}/max_tokenz"
            await cms.put(bus, unknown_key, 5, version=1)
            unknown = (await refused(bus, unknown_key)).message
            await cms.delete(bus, unknown_key)
    assert first.outcome == "cloud" and first.steps[-1].topic == "cloud:gpt-4"
    assert home.requests[0]["headers"]["Authorization"] == f"Bearer {home.api_key}"
    assert moved.outcome == "cloud" and len(other.requests) == 3  # moved, renamed, kept
    assert "Authorization" not in other.requests[0]["headers"]  # the key stays with its host
    assert renamed.steps[-1].topic == "cloud:small-1"
    assert other.requests[1]["body"]["model"] == "small-1"
    assert all(f"keeping '{other.url}'" in p for p in problems), problems
    assert "URL scheme should be 'http' or 'https'" in problems[0]
    assert kept.outcome == "cloud" and other.requests[2]["body"]["model"] == "small-1"
    assert none.outcome == "rejected"  # null: no cloud
    assert back.outcome == "cloud" and len(home.requests) == 2
    assert "unknown config key" in unknown and "<model>/max_tokens" in unknown
    assert "unknown config key" in wildcard


async def test_tasks_go_only_to_the_configured_model_version(
    mqtt, login, uid, spawn, tiny_model_dir, tmp_path
):
    model = f"tiny-{uid}"
    folder = tiny_named(tiny_model_dir, tmp_path / model, model)
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    for version in ("a", "b"):
        spawn("services.worker", "--agent-id", f"w{version}-{uid}", "--backend", "onnx",
              "--model-dir", str(folder), "--threads", "1", "--model-version", version)  # fmt: skip
    key = f"configs/{model}/version"
    wild = f"configs/*-{uid}/version"
    async with refusals(login, uid, "orchestrator") as (bus, view):
        await wait_for(online(view, f"orch-{uid}", f"wa-{uid}", f"wb-{uid}"), timeout=60)

        async def agents(n: int = 4) -> set[str | None]:
            answers = [await ask(bus, "hi", max_tokens=2) for _ in range(n)]
            return {a.steps[-1].agent for a in answers}

        try:
            await cms.put(bus, key, "b", version=1)
            on_b = await agents()
            await cms.put(bus, key, "a", version=2)
            on_a = await agents()
            await cms.put(bus, key, "no spaces please", version=3)
            bad = (await refused(bus, key)).message
            still_a = await agents()
            await cms.put(bus, key, "c", version=4)
            nobody = await ask(bus, "hi", max_tokens=2)
            await cms.put(bus, wild, "a", version=1)
            wildcard = (await refused(bus, wild)).message
        finally:
            await cms.delete(bus, key)
            await cms.delete(bus, wild)
        card = view.agent(f"wa-{uid}").card
    assert card.model.name == model and card.model.version == "a"
    assert on_b == {f"wb-{uid}"} and on_a == {f"wa-{uid}"} and still_a == {f"wa-{uid}"}
    assert "keeping 'a'" in bad and "version" in bad
    assert nobody.outcome == "rejected"
    assert "no wildcards" in wildcard
