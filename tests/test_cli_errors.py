"""The edgecollab command never throws: bad input ends in one line on stderr and a non-zero
exit status, never a traceback; a reader that goes away ends it quietly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.core.bus import Bus
from services.core.cms import CmsView
from tests.broker import ROOT
from tests.conftest import running, wait_for
from tools.common.broker import free_port

LONG = "why " * 5000  # 20 KB
HUGE_KEY = "k" * 70_000


def edgecollab(*args: str, stdin: bytes | None = None, timeout: float = 60):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "tools.cli.main", *args],
        cwd=ROOT,
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=timeout,
    )


def assert_one_line_error(result, *words: str) -> None:  # type: ignore[no-untyped-def]
    out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert result.returncode != 0, (out, err)
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgecollab: "), err
    for word in words:
        assert word in lines[0], lines[0]


BAD_INPUT = {
    "ask-empty": (["ask", ""], None, "empty"),
    "ask-blank": (["ask", "   \n "], None, "empty"),
    "ask-nothing": (["ask"], None, "no question"),
    "ask-20kb": (["ask", LONG], None, "20,000 characters"),
    "ask-stdin-empty": (["ask", "-"], b"", "empty"),
    "ask-stdin-20kb": (["ask", "-"], LONG.encode(), "20,000 characters"),
    "ask-stdin-binary": (["ask", "-"], b"\xff\xfe\x00", "not UTF-8"),
    "ask-missing-file": (["ask", "--file", "/nonexistent/q.txt"], None, "cannot read"),
    "ask-file-and-text": (["ask", "hi", "--file", "/etc/hostname"], None, "not both"),
    "ask-max-tokens-0": (["ask", "hi", "--max-tokens", "0"], None, "--max-tokens"),
    "ask-max-tokens-huge": (["ask", "hi", "--max-tokens", "100000"], None, "--max-tokens"),
    "ask-timeout-0": (["ask", "hi", "--timeout", "0"], None, "--timeout"),
    "ask-temperature-9": (["ask", "hi", "--temperature", "9"], None, "temperature"),
    "put-hash": (["cms", "put", "configs/#", "1"], None, "wildcards"),
    "put-plus": (["cms", "put", "configs/+/max_tokens", "1"], None, "wildcards"),
    "put-empty": (["cms", "put", "", "1"], None, "empty CMS key"),
    "put-slash": (["cms", "put", "/", "1"], None, "empty CMS key"),
    "put-root": (["cms", "put", "cms", "1"], None, "under cms/"),
    "put-dotdot": (["cms", "put", "configs/../agents/x", "1"], None, "'..'"),
    "put-double-slash": (["cms", "put", "configs//x", "1"], None, "'//'"),
    "put-70k": (["cms", "put", HUGE_KEY, "1"], None, "70,000 characters"),
    "put-expiry": (["cms", "put", "configs/x", "1", "--expiry", "-1"], None, "--expiry"),
    "put-config-type": (["cms", "put", "configs/m/max_tokens", "lots"], None, "integer 1-4096"),
    "put-config-huge": (["cms", "put", "configs/m/max_tokens", "1e9"], None, "integer 1-4096"),
    "put-config-unknown": (["cms", "put", "configs/m/max_tokenz", "5"], None, "unknown config"),
    "put-config-wildcard": (["cms", "put", "configs/*/max_tokens", "5"], None, "no wildcards"),
    "put-config-url": (["cms", "put", "configs/fallback_endpoint", "ftp://x"], None, "'https'"),
    "get-hash": (["cms", "get", "#"], None, "wildcards"),
    "get-dotdot": (["cms", "get", "a/../b"], None, "'..'"),
    "get-70k": (["cms", "get", HUGE_KEY], None, "1024"),
    "rm-empty": (["cms", "rm", ""], None, "empty CMS key"),
    "rm-plus": (["cms", "rm", "agents/+"], None, "wildcards"),
    "rm-double-slash": (["cms", "rm", "a//b"], None, "'//'"),
    "rm-70k": (["cms", "rm", HUGE_KEY], None, "1024"),
    "ls-hash": (["cms", "ls", "agents/#"], None, "wildcards"),
    "watch-plus": (["cms", "watch", "+"], None, "wildcards"),
    "broker-port": (["agents", "--broker", "localhost:99999"], None, "65535"),
    "broker-garbage": (["cms", "ls", "--broker", "nohost:port"], None, "host:port"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_line_and_a_non_zero_exit(mqtt, case):
    args, stdin, words = BAD_INPUT[case]
    broker = [] if "--broker" in args else ["--broker", f"{mqtt.host}:{mqtt.port}"]
    assert_one_line_error(edgecollab(*args, *broker, stdin=stdin), words)


def test_no_broker_is_one_line():
    result = edgecollab("cms", "ls", "--broker", f"127.0.0.1:{free_port()}")
    assert_one_line_error(result, "no MQTT broker answers")


async def test_a_reader_that_leaves_ends_the_command_quietly(mqtt, login, uid):
    operator = f"operator-{uid}"  # configs/ are the operators'
    bus = Bus(settings=login(operator, "operator"), client_id=operator, service="test")
    async with running(bus):
        from services.core import cms

        for i in range(50):
            await cms.put(bus, f"configs/m-{uid}/k{i}", "x" * 100, version=1)
    broker = f"{mqtt.host}:{mqtt.port}"
    for args in (["cms", "ls"], ["cms", "get", "--json"], ["agents"], ["cms", "get"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.cli.main", *args, "--broker", broker],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        proc.stdout.close()  # the reader is gone before the first line
        err = proc.stderr.read().decode()
        proc.wait(60)
        assert proc.returncode != 0 and "Traceback" not in err and "Error" not in err, err
    shell = subprocess.run(
        f"{sys.executable} -m tools.cli.main cms ls --broker {broker} | head -1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.stdout.startswith("cms/") and len(shell.stdout.splitlines()) == 1
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr, shell.stderr


async def test_ask_reads_a_long_question_from_stdin_or_a_file(
    spawn, mqtt, login, uid, tmp_path: Path
):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.worker", "--agent-id", f"w-{uid}", "--tokens-per-s", "200")
    bus = Bus(settings=login(f"c-{uid}"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        await wait_for(lambda: view.online(f"orch-{uid}", f"w-{uid}"))
    question = "Summarise this. " + "The edge serves it. " * 300  # 6 KB
    broker = ["--broker", f"{mqtt.host}:{mqtt.port}", "--max-tokens", "3", "--json"]
    piped = edgecollab("ask", "-", *broker, stdin=question.encode())
    assert piped.returncode == 0, piped.stderr
    assert b'"outcome": "edge"' in piped.stdout
    path = tmp_path / "question.txt"
    path.write_text(question)
    filed = edgecollab("ask", "--file", str(path), *broker)
    assert filed.returncode == 0 and b'"outcome": "edge"' in filed.stdout, filed.stderr
