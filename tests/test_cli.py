"""The edgecollab command line against a real broker and stack."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading

from schemas import AgentCard, now
from services.core.presence import card_entry
from services.core.topics import AGENT_CARD
from tests.broker import ROOT
from tests.conftest import mqtt_client


def cli(mqtt, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "tools.cli.main", *args, "--broker", f"{mqtt.host}:{mqtt.port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("up", "ask", "agents", "cms", "schemas", "bench"):
        assert command in out


def test_cms_put_get_ls_rm_round_trip(mqtt, uid):
    key = f"configs/m-{uid}/max_tokens"
    assert cli(mqtt, "cms", "put", key, "256").returncode == 0
    assert cli(mqtt, "cms", "put", key, "512").stdout.strip().endswith("(v2)")
    got = json.loads(cli(mqtt, "cms", "get", f"configs/m-{uid}", "--json").stdout)
    assert got[f"cms/{key}"]["value"] == 512 and got[f"cms/{key}"]["version"] == 2
    listed = json.loads(cli(mqtt, "cms", "ls", "configs/", "--json").stdout)
    assert f"cms/{key}" in listed
    assert cli(mqtt, "cms", "rm", key).returncode == 0
    missing = cli(mqtt, "cms", "get", key)
    assert missing.returncode == 1 and "no key" in missing.stdout


def next_line(stream, timeout: float = 60) -> str:  # type: ignore[no-untyped-def]
    """The next line a child prints; fails, rather than blocks, when none comes."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    return lines.get(timeout=timeout)


def test_cms_watch_prints_changes(mqtt, uid):
    key = f"parameters/m-{uid}/temperature"
    assert cli(mqtt, "cms", "put", key, "0.1").returncode == 0
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "cms",
            "watch",
            f"parameters/m-{uid}",
            "--json",
            "--broker",
            f"{mqtt.host}:{mqtt.port}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        listed = json.loads(next_line(watch.stdout))  # the entry there was: it watches now
        cli(mqtt, "cms", "put", key, "0.3")
        changed = json.loads(next_line(watch.stdout))
    finally:
        watch.kill()
        cli(mqtt, "cms", "rm", key)
    assert listed["key"] == f"cms/{key}" and listed["entry"]["value"] == 0.1
    assert changed["key"] == f"cms/{key}" and changed["entry"]["value"] == 0.3


def test_ask_streams_and_prints_provenance(mqtt, uid, spawn):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.worker", "--agent-id", f"w-{uid}", "--tokens-per-s", "500")
    ready = cli(mqtt, "agents", "--wait-for", f"orch-{uid},w-{uid}", "--timeout", "30")
    assert ready.returncode == 0, ready.stdout
    out = cli(mqtt, "ask", "hello there", "--max-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert "edge models cooperate" in out.stdout
    assert re.search(rf"answer\s+edge\s+w-{uid}\s+ok\s+[1-9]\d*\+12\s", out.stdout), out.stdout
    answer = json.loads(cli(mqtt, "ask", "hello", "--json", "--max-tokens", "3").stdout)
    assert answer["outcome"] == "edge" and answer["steps"][0]["output_tokens"] == 3


def test_no_broker_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "agents", "--broker", "127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and "no MQTT broker answers at 127.0.0.1:1" in out.stderr


async def test_agents_lists_10000_agents(open_broker, uid):
    prefix, count = f"a{uid}", 10_000
    writer = open_broker.anonymous  # one client for 10,000 agents: the broker without an ACL
    async with mqtt_client(writer, max_inflight_messages=1000) as pub:
        for i in range(count):
            card = AgentCard(agent=f"{prefix}-{i}", kind="sensor", epoch=1, started_at=now())
            body = card_entry(card).model_dump_json()
            await pub.publish(AGENT_CARD.format(agent=f"{prefix}-{i}"), body, qos=1, retain=True)
    try:
        out = cli(writer, "agents", "--kind", "sensor", "--json", timeout=120)
        rows = [r for r in json.loads(out.stdout) if r["agent"].startswith(prefix + "-")]
        assert len(rows) == count and all(r["state"] == "offline" for r in rows)
    finally:
        async with mqtt_client(writer) as pub:
            for i in range(count):
                await pub.publish(AGENT_CARD.format(agent=f"{prefix}-{i}"), b"", retain=True)


def test_up_starts_a_broker_and_the_services_and_ctrl_c_stops_them(tmp_path):
    from tools.common.broker import broker_answers, free_port

    port, tls_port = free_port(), free_port()
    env = {**os.environ, "EDGECOLLAB_STATE_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "tools.cli.main", "up", "--only", "orchestrator",
         "--broker", f"127.0.0.1:{port}", "--tls-port", str(tls_port), "--cert-port", "0",
         "--listen", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        said = [next_line(up.stdout)]
        while "services on" not in said[-1]:  # the accounts and the broker are there now
            said.append(next_line(up.stdout))
        # the CLI on the box finds an operator account in the state dir by itself
        ready = subprocess.run(
            [sys.executable, "-m", "tools.cli.main", "agents", "--wait-for", "orchestrator-1",
             "--timeout", "60", "--broker", f"127.0.0.1:{port}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert ready.returncode == 0, ready.stdout
        assert "orchestrator-1" in ready.stdout and "online" in ready.stdout
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
    out = "".join(said) + out
    assert up.returncode == 0
    assert "starting mosquitto" in out and "up: stopped" in out
    assert not broker_answers("127.0.0.1", port)


def test_bench_bus_counts_every_request_on_all_four_paths():
    args = ["--requests", "200", "--sequential", "20", "--in-flight", "16"]
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "bench", "bus", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    for path in ("bare_aiomqtt", "bare_paho", "stack", "gateway"):
        assert result[path]["failed"] == 0 and result[path]["req_per_s"] > 0
    assert result["stack"]["lost"] == 0 and result["gateway"]["lost"] == 0
    assert result["stack"]["cpu_ms_per_request"]["orchestrator"] > 0
    assert result["gateway"]["cpu_ms_per_request"]["gateway"] > 0
    assert set(result["ratio_to_paho"]) == {"p50", "throughput"}
    assert set(result["ratio_gateway_to_stack"]) == {"p50", "throughput"}


def test_supervisor_restarts_what_exits_and_leaves_the_rest_running():
    import threading
    import time

    from tools.common.supervise import Child, Supervisor

    def popen(code: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", code])

    lines: list[str] = []
    crashing = Child("crashing", lambda: popen("import sys; sys.exit(3)"))
    steady = Child("steady", lambda: popen("import time; time.sleep(600)"))
    supervisor = Supervisor([crashing, steady], say=lines.append)
    runner = threading.Thread(target=supervisor.run, kwargs={"poll_s": 0.05})
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while crashing.restarts < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert crashing.restarts >= 2 and steady.restarts == 0
        assert steady.proc is not None and steady.proc.poll() is None
    finally:
        supervisor.request_stop()
        runner.join(30)
    assert "crashing exited with 3; restarting in 1 s" in lines
    assert "crashing exited with 3; restarting in 2 s" in lines  # backoff doubles
    assert steady.proc.poll() is not None and lines[-1] == "stopped"
