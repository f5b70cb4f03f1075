"""The orchestrator live: policies by name, edge admission, cloud fallback, metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from schemas import CmsEntry, Rejected, Task, TaskResult
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.topics import METRIC, TASKS
from tests.broker import ROOT
from tests.conftest import running, wait_for
from tests.test_cli import cli
from tests.test_stack import ask, online
from tools.bench.fake_cloud import FakeCloud


def start(spawn, uid: str, *orchestrator_args: str, concurrency: str = "1"):  # type: ignore[no-untyped-def]
    orchestrator = spawn(
        "services.orchestrator",
        "--agent-id",
        f"orch-{uid}",
        "--metrics-interval-s",
        "0.2",
        *orchestrator_args,
    )
    spawn(
        "services.worker",
        "--agent-id",
        f"w-{uid}",
        "--tokens-per-s",
        "20",
        "--concurrency",
        concurrency,
    )
    return orchestrator


async def two_at_once(login, uid: str):  # type: ignore[no-untyped-def]
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        await wait_for(online(view, f"orch-{uid}", f"w-{uid}"))
        answers = await asyncio.gather(ask(bus, max_tokens=10), ask(bus, max_tokens=10))
        return sorted(answers, key=lambda a: a.outcome), view, bus


async def test_worker_at_its_limit_rejects_at_once(login, uid, spawn):
    spawn("services.worker", "--agent-id", f"w-{uid}", "--tokens-per-s", "10", "--concurrency", "1")
    # the test sends tasks itself, as an orchestrator does
    bus = Bus(settings=login(f"c-{uid}", "orchestrator"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)

    def task(n: int) -> Task:
        return Task(
            task_id=f"t{n}",
            request_id=f"r{n}",
            prompt="hi",
            max_tokens=10,
            deadline=time.time() + 10,
        )

    async with running(bus):
        await wait_for(online(view, f"w-{uid}"))
        topic = TASKS.format(agent=f"w-{uid}")
        replies = await asyncio.gather(
            *(bus.request(topic, task(n), deadline=time.time() + 10) for n in range(2))
        )
    rejected = [r for r in replies if isinstance(r, Rejected)]
    assert len(rejected) == 1 and any(isinstance(r, TaskResult) for r in replies)
    assert (rejected[0].active, rejected[0].limit) == (1, 1)


async def test_full_edge_without_cloud_is_a_clear_rejection(login, uid, spawn):
    start(spawn, uid, "--policy", "load_aware")
    answers, _, _ = await two_at_once(login, uid)
    assert [a.outcome for a in answers] == ["edge", "rejected"]
    rejected = answers[1]
    refused = rejected.steps[0]
    assert refused.where == "none" and refused.outcome == "rejected"
    assert f"w-{uid} at its limit" in refused.detail
    assert "no cloud endpoint is configured" in rejected.text


async def test_full_edge_goes_to_the_cloud_and_pays_for_it(login, uid, spawn):
    with FakeCloud(reply="from the cloud", usage=(1000, 500)) as cloud:
        orchestrator = start(
            spawn,
            uid,
            "--policy",
            "load_aware",
            "--cloud-url",
            cloud.url,
            "--cloud-api-key",
            cloud.api_key,
        )
        answers, _, _ = await two_at_once(login, uid)
    log = Path(orchestrator.log_path).read_text()
    assert "cloud.reply" in log and cloud.api_key not in log
    assert [a.outcome for a in answers] == ["edge", "rejected_to_cloud"]
    cloud_answer = answers[1]
    assert cloud_answer.text == "from the cloud"
    assert [s.where for s in cloud_answer.steps] == ["none", "cloud"]
    assert abs(cloud_answer.cost_usd - (1000 * 30 + 500 * 60) / 1e6) < 1e-9
    headers = {k.lower(): v for k, v in cloud.requests[0]["headers"].items()}
    assert headers["authorization"] == f"Bearer {cloud.api_key}"


async def test_earliest_finish_waits_for_a_slot_instead_of_paying(login, uid, spawn):
    with FakeCloud() as cloud:
        start(
            spawn,
            uid,
            "--policy",
            "earliest_finish",
            "--cloud-url",
            cloud.url,
            "--cloud-api-key",
            cloud.api_key,
        )
        answers, _, _ = await two_at_once(login, uid)
    assert [a.outcome for a in answers] == ["edge", "edge"] and not cloud.requests


async def test_cloud_that_keeps_failing_fails_the_request_and_service_goes_on(login, uid, spawn):
    with FakeCloud(faults=["503", "garbage", "503"]) as cloud:
        start(
            spawn,
            uid,
            "--policy",
            "load_aware",
            "--cloud-url",
            cloud.url,
            "--cloud-api-key",
            cloud.api_key,
            "--cloud-retries",
            "2",
        )
        answers, view, bus = await two_at_once(login, uid)
        assert [a.outcome for a in answers] == ["edge", "failed"]
        assert answers[1].steps[-1].where == "cloud" and len(cloud.requests) == 3
        async with running(bus):
            await wait_for(online(view, f"orch-{uid}", f"w-{uid}"))
            answers = await asyncio.gather(ask(bus, max_tokens=10), ask(bus, max_tokens=10))
    assert sorted(a.outcome for a in answers) == ["edge", "rejected_to_cloud"]


async def test_outcomes_and_cost_are_published_as_cms_metrics(mqtt, login, uid, spawn):
    with FakeCloud(usage=(100, 100)) as cloud:
        start(
            spawn,
            uid,
            "--policy",
            "load_aware",
            "--cloud-url",
            cloud.url,
            "--cloud-api-key",
            cloud.api_key,
        )
        _, view, bus = await two_at_once(login, uid)
        key = METRIC.format(scope=f"orch-{uid}", name="requests")
        async with running(bus):
            await view.synced()
            await wait_for(lambda: (e := view.entries.get(key)) and e.value["requests"] == 2)
        shown = cli(mqtt, "metrics")
    metrics: CmsEntry = view.entries[key]
    assert f"orch-{uid}" in shown.stdout and "load_aware" in shown.stdout
    assert metrics.value["processed_edge"] == 1 and metrics.value["rejected_edge"] == 1
    assert metrics.value["cloud"] == 1 and metrics.value["policy"] == "load_aware"
    assert abs(metrics.value["cloud_cost_usd"] - 0.009) < 1e-9


def test_unknown_policy_is_a_clear_startup_error(mqtt):
    out = subprocess.run(
        [sys.executable, "-m", "services.orchestrator", "--policy", "fastest"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and "unknown policy 'fastest'" in out.stderr
    assert "earliest_finish" in out.stderr
