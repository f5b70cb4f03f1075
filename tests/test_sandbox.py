"""The sandboxed calculator peer: what a program may not do, and the service on a real bus."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import orjson
import pytest

from schemas import ProgramResult, ProgramRun
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import RemoteError
from services.core.topics import ARITHMETIC
from services.sandbox.runner import Limits, Sandbox
from tests.conftest import running


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return asyncio.run(Sandbox.detect())


def run(sandbox: Sandbox, program: str, limits: Limits | None = None):  # type: ignore[no-untyped-def]
    return asyncio.run(sandbox.run(program, limits or Limits(wall_s=60, cpu_s=10)))


def test_a_program_prints_its_result(sandbox):
    outcome = run(sandbox, "import math\nprint(math.comb(10, 3))")
    assert outcome.ok and outcome.stdout == "120\n" and outcome.exit_code == 0


def test_a_failing_program_says_why(sandbox):
    outcome = run(sandbox, "x = 1\nprint(x / 0)")
    assert not outcome.ok and outcome.exit_code == 1
    assert outcome.error == "ZeroDivisionError: division by zero"


def test_the_program_gets_an_empty_environment_and_no_privileges(sandbox):
    outcome = run(
        sandbox, "import os, sys\nprint(sorted(os.environ), os.getuid(), sys.flags.isolated)"
    )
    names, uid, isolated = outcome.stdout.rsplit(" ", 2)
    assert set(eval(names)) <= {"LC_CTYPE"}  # what the interpreter itself sets
    assert int(uid) != 0 and isolated.strip() == "1"


def test_no_network_not_even_loopback(sandbox):
    async def scenario() -> tuple[object, int]:
        accepted = 0

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        program = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
            "print('connected')\n"
        )
        async with server:
            outcome = await sandbox.run(program, Limits(wall_s=60))
        return outcome, accepted

    outcome, accepted = asyncio.run(scenario())
    assert not outcome.ok and "connected" not in outcome.stdout and accepted == 0
    raw = run(sandbox, "import _socket\n_socket.socket()\nprint('made')")
    assert not raw.ok and "socket" in (raw.error or "")


def test_a_network_namespace_has_no_interface_but_loopback(sandbox):
    if not sandbox.network_namespace:
        pytest.skip("this kernel does not let us make a network namespace")
    outcome = run(sandbox, "print(open('/proc/net/dev').read())")
    interfaces = [line.split(":")[0].strip() for line in outcome.stdout.splitlines()[2:]]
    assert outcome.ok and [i for i in interfaces if i] == ["lo"]


def test_a_busy_loop_is_killed_at_its_cpu_limit(sandbox):
    outcome = run(sandbox, "while True:\n    pass", Limits(wall_s=600, cpu_s=1))
    assert outcome.timed_out and not outcome.ok and outcome.exit_code is None
    assert "CPU time limit" in (outcome.error or "")


def test_a_sleeper_is_killed_at_its_wall_clock_limit(sandbox):
    outcome = run(sandbox, "import time\ntime.sleep(600)\nprint('woke')", Limits(wall_s=0.5))
    assert outcome.timed_out and outcome.stdout == "" and "timed out" in (outcome.error or "")


def test_writes_stay_inside_the_temporary_folder(sandbox, tmp_path: Path):
    world_writable = Path("/tmp") / f"edgecollab-escape-{uuid.uuid4().hex}"
    for target in (tmp_path / "escaped.txt", world_writable):
        for program in (
            f"open({str(target)!r}, 'w').write('x')",
            f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
            f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        ):
            outcome = run(sandbox, program)
            assert not outcome.ok and "PermissionError" in (outcome.error or ""), program
            assert not target.exists()
    escape = run(sandbox, "import os\nos.mkdir('../edgecollab-escape-dir')")
    assert not escape.ok and "PermissionError" in (escape.error or "")
    inside = run(sandbox, "open('note.txt', 'w').write('kept')\nprint(open('note.txt').read())")
    assert inside.ok and inside.stdout == "kept\n"


def test_a_fork_bomb_cannot_fork(sandbox):
    outcome = run(sandbox, "import os\nwhile True:\n    os.fork()")
    assert not outcome.ok and outcome.error == (
        "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    )  # RLIMIT_NPROC 0: the kernel refuses the first fork
    limit = run(sandbox, "import resource\nprint(resource.getrlimit(resource.RLIMIT_NPROC))")
    assert limit.stdout == "(0, 0)\n"
    threads = run(sandbox, "import threading\nthreading.Thread(target=print).start()")
    assert not threads.ok and "can't start new thread" in (threads.error or "")


def test_no_subprocess_exec_or_ctypes(sandbox):
    for program in (
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo hi'])",
        "import os\nos.system('echo hi')",
        "import ctypes",
    ):
        outcome = run(sandbox, program)
        assert not outcome.ok and "hi" not in outcome.stdout, program


def test_output_is_capped(sandbox):
    outcome = run(
        sandbox, "while True:\n    print('x' * 100)", Limits(wall_s=60, output_bytes=1000)
    )
    assert outcome.truncated and not outcome.ok and len(outcome.stdout) == 1000


def test_memory_and_file_size_are_limited(sandbox):
    memory = run(sandbox, "x = bytearray(4 * 1024**3)", Limits(wall_s=60, memory_bytes=256 * 2**20))
    assert not memory.ok and memory.error == "MemoryError"
    big = run(sandbox, "open('big', 'wb').write(b'x' * 3 * 2**20)", Limits(wall_s=60))
    assert not big.ok and "File too large" in (big.error or "")


# -- the service on the bus ------------------------------------------------------------------


async def request(bus: Bus, body: ProgramRun) -> ProgramResult:
    reply = await bus.request(ARITHMETIC.format(), body, deadline=body.deadline)
    assert isinstance(reply, ProgramResult)
    return reply


def program_run(program: str, **fields: object) -> ProgramRun:
    return ProgramRun(
        request_id=f"p{time.time_ns()}", program=program, deadline=time.time() + 60, **fields
    )


async def test_the_sandbox_peer_runs_programs_and_refuses_bad_input(mqtt, login, uid, spawn):
    spawn("services.sandbox", "--agent-id", f"sbx-{uid}", "--max-program-bytes", "1000")
    bus = Bus(settings=login(f"c-{uid}", "orchestrator"), client_id=f"c-{uid}", service="test")
    view = CmsView(bus)
    async with running(bus):
        assert await view.wait_online([f"sbx-{uid}"], timeout=60)
        card = view.agent(f"sbx-{uid}").card
        assert card.kind == "sandbox" and card.domains == ["arithmetic"]
        result = await request(bus, program_run("print(sum(range(101)))"))
        assert result.ok and result.stdout == "5050\n" and result.agent == f"sbx-{uid}"
        failed = await request(bus, program_run("import time\ntime.sleep(60)", timeout_s=0.5))
        assert failed.timed_out and not failed.ok

        topic, deadline = ARITHMETIC.format(), time.time() + 30
        bad = {
            "bad_json": b"{not json",
            "too_large": program_run("print(1)  #" + "x" * 2000).model_dump_json().encode(),
            "bad_schema": orjson.dumps({"v": 1, "type": "program_run", "request_id": "r1"}),
        }
        for code, payload in bad.items():
            with pytest.raises(RemoteError) as refused:
                await bus.request_raw(topic, payload, deadline=deadline)
            assert refused.value.error.code == code and refused.value.error.service == "sandbox"
        again = await request(bus, program_run("print(6 * 7)"))
        assert again.ok and again.stdout == "42\n"  # it kept serving
