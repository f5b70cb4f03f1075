"""Running an untrusted Python program in a confined child process, and what it printed.

A run is a fresh interpreter, `python -I -S -B -c <guard>`: isolated mode (no PYTHON*
variables, no user site), no `site` module, no bytecode written, an empty environment, stdin
closed once the program is read from it, its own session, a fresh temporary folder as its
working directory (removed afterwards). Before the interpreter starts (`preexec_fn`, in the
child) it gets:

- **no network**: a new, empty network namespace (unshare(CLONE_NEWNET), no interfaces, not
  even loopback) where the kernel allows it (root, or CAP_SYS_ADMIN);
- **an unprivileged user**: started as root it becomes uid/gid 65534 (nobody) with no
  supplementary groups, so the file tree outside world-writable folders is read-only to it;
- **resource limits** (setrlimit): CPU seconds (SIGXCPU, then SIGKILL one second later),
  address space, size of any file it writes, open files, no core dumps.

The guard code then, before the program's first line:

- sets RLIMIT_NPROC to 0: no fork, no thread, no new process of any kind (the kernel refuses
  them with EAGAIN; it is set once the child runs as its own user, because execve itself fails
  for a user over its process limit);
- installs an audit hook (PEP 578) that refuses socket creation and every socket call, ctypes,
  exec/spawn/system/Popen, signals to other processes, the gc walks that could reach the hook,
  and any file opened for writing, created, removed, renamed, linked or changed outside the
  temporary folder. Audit hooks cannot be removed; this is the second line (and the only one
  for the network where namespaces are not allowed, and for files when not started as root).

The parent enforces a wall-clock timeout (the process group is killed) and caps what it reads
of stdout (past the cap the program is killed and its output marked truncated) and of stderr
(the last bytes are kept: that is where a traceback ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("edgecollab.sandbox")

NOBODY = 65534
_CLONE_NEWNET = 0x40000000
_PROBE = "print(6 * 7)"
_PROBE_OUTPUT = "42"

# Runs in the child before the program (argv[1] is its temporary folder; the program is stdin).
GUARD = r"""
import os, resource, sys

def _guard(root, getcwd=os.getcwd):
    sep = "/"
    writing = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    denied = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink", "os.link",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    ))
    prefixes = ("socket.", "ctypes.", "_ctypes.")
    # (event, indices of its path arguments, indices of its dir_fd arguments); immutable, as
    # everything the hook holds: its frame's variables are visible in a traceback.
    paths = (
        ("os.mkdir", (0,), (2,)), ("os.rename", (0, 1), (2, 3)), ("os.remove", (0,), (1,)),
        ("os.rmdir", (0,), (1,)), ("os.chmod", (0,), (2,)), ("os.chown", (0,), (3,)),
        ("os.truncate", (0,), ()), ("os.utime", (0,), (3,)), ("os.setxattr", (0,), ()),
        ("os.removexattr", (0,), ()), ("os.chflags", (0,), ()), ("os.lchflags", (0,), ()),
        ("os.mkfifo", (0,), (2,)), ("os.mknod", (0,), (3,)),
    )
    path_events = frozenset(name for name, _, _ in paths)

    def inside(path, relative_ok=True):
        # Only exact str/bytes (no subclass or PathLike can answer differently twice); a
        # string normalisation is enough because no symlink can be made inside `root`.
        if type(path) is int:
            return True  # an open descriptor: checked when it was opened
        if type(path) is bytes:
            path = path.decode("utf-8", "surrogateescape")
        if type(path) is not str or not (relative_ok or path.startswith(sep)):
            return False
        if not path.startswith(sep):
            path = getcwd() + sep + path
        parts = []
        for part in path.split(sep):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        full = sep + sep.join(parts)
        return full == root or full.startswith(root + sep)

    def hook(event, args):
        if event in denied or event.startswith(prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if mode is None:  # os.open, whose dir_fd the event does not show: absolute only
                if (flags or 0) & writing and not inside(path, relative_ok=False):
                    raise PermissionError(f"sandbox: os.open for writing outside: {path!r}")
            elif any(c in mode for c in "wax+") and not inside(path):
                raise PermissionError(f"sandbox: writing outside the sandbox folder: {path!r}")
        elif event in path_events:
            for name, where, dir_fds in paths:
                if name != event:
                    continue
                if any(args[i] not in (None, -1) for i in dir_fds if i < len(args)):
                    raise PermissionError(f"sandbox: {event} relative to a descriptor")
                if not all(inside(args[i]) for i in where):
                    raise PermissionError(f"sandbox: {event} outside the sandbox folder")

    return hook

resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
_source = sys.stdin.read()
sys.addaudithook(_guard(sys.argv[1]))
del _guard
_code = compile(_source, "program.py", "exec")
del _source
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one run may use."""

    wall_s: float = 5.0  # wall clock, then the process group is killed
    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU)
    memory_bytes: int = 512 * 2**20  # address space (RLIMIT_AS)
    file_bytes: int = 2**20  # any one file written (RLIMIT_FSIZE)
    output_bytes: int = 64 * 2**10  # stdout read before the program is killed
    stderr_bytes: int = 4 * 2**10  # the tail of stderr kept
    open_files: int = 64  # RLIMIT_NOFILE

    def within(self, timeout_s: float) -> Limits:
        """These limits with the wall clock (and CPU time) at most `timeout_s`."""
        wall = max(0.05, min(self.wall_s, timeout_s))
        cpu = max(1, min(self.cpu_s, math.ceil(wall)))
        return Limits(wall, cpu, self.memory_bytes, self.file_bytes, self.output_bytes,
                      self.stderr_bytes, self.open_files)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended: `ok` when it exited 0 in time with all its output read."""

    stdout: str
    stderr: str
    exit_code: int | None  # None when the sandbox killed it
    timed_out: bool
    truncated: bool
    error: str | None
    ms: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.truncated


@dataclass(frozen=True, slots=True)
class Sandbox:
    """How programs are run here: the interpreter, the user, and whether a network
    namespace is made (see `Sandbox.detect`)."""

    python: str
    user: int | None  # uid = gid to drop to (when started as root), else None
    network_namespace: bool

    @classmethod
    async def detect(
        cls, python: str | None = None, *, user: int = NOBODY, netns: bool = True
    ) -> Sandbox:
        """The confinement this process can give: the first interpreter (`python`, else this
        one, else python3 on the PATH) that runs a probe program as the unprivileged user;
        a network namespace if one can be made. Raises RuntimeError when nothing runs."""
        drop = user if os.geteuid() == 0 else None
        tried = []
        for candidate in _candidates(python):
            for namespace in (True, False) if netns else (False,):
                sandbox = cls(candidate, drop, namespace)
                outcome = await sandbox.run(_PROBE, Limits(wall_s=30.0, cpu_s=10))
                if outcome.ok and outcome.stdout.strip() == _PROBE_OUTPUT:
                    log.info("sandbox.ready", python=candidate, user=drop, netns=namespace)
                    return sandbox
                tried.append(f"{candidate} (netns {namespace}): {outcome.error}")
        raise RuntimeError("no interpreter runs confined here: " + "; ".join(tried))

    async def run(self, program: str, limits: Limits) -> Outcome:
        """Run `program`; never raises for anything the program does."""
        started = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix="edgecollab-sandbox-")).resolve()
        try:
            if self.user is not None:
                os.chown(workdir, self.user, self.user)
            os.chmod(workdir, 0o700)
            return await self._run(program, limits, workdir, started)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def _run(self, program: str, limits: Limits, workdir: Path, started: float) -> Outcome:
        def elapsed() -> float:
            return round((time.perf_counter() - started) * 1000, 3)

        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-I", "-S", "-B", "-c", GUARD, str(workdir),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=workdir, env={}, close_fds=True,
                start_new_session=True, preexec_fn=_Confine(limits, self),
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:  # e.g. the confinement failed
            return Outcome("", "", None, False, False, f"could not start: {exc}", elapsed())
        killed: list[str] = []

        def kill(why: str) -> None:
            killed.append(why)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(program.encode())
                await proc.stdin.drain()
                proc.stdin.close()
                await proc.stdin.wait_closed()

        async def stdout() -> tuple[bytes, bool]:
            assert proc.stdout is not None
            data = bytearray()
            while chunk := await proc.stdout.read(65536):
                if len(data) + len(chunk) > limits.output_bytes:
                    data += chunk[: limits.output_bytes - len(data)]
                    kill("output")
                    while await proc.stdout.read(65536):  # to EOF, so the pipe closes now
                        pass
                    return bytes(data), True
                data += chunk
            return bytes(data), False

        async def stderr() -> bytes:
            assert proc.stderr is not None
            tail = b""
            while chunk := await proc.stderr.read(65536):
                tail = (tail + chunk)[-limits.stderr_bytes :]
            return tail

        out, err, truncated, timed_out = b"", b"", False, False
        try:
            async with asyncio.timeout(limits.wall_s):
                _, (out, truncated), err = await asyncio.gather(feed(), stdout(), stderr())
                code = await proc.wait()
        except TimeoutError:
            kill("time")
            timed_out = True
            code = await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled: leave nothing behind
                kill("cancelled")
                await proc.wait()
            if proc.stdin is not None:  # a feed cut short by the timeout left it open
                proc.stdin.close()
        error = _why(code, killed, limits, err)
        cpu_killed = code in (-signal.SIGXCPU, -signal.SIGKILL) and not killed
        return Outcome(
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            exit_code=None if killed or code < 0 else code,
            timed_out=timed_out or cpu_killed,
            truncated=truncated,
            error=error,
            ms=elapsed(),
        )


class _Confine:
    """The child's confinement between fork and exec (no allocation-heavy work here)."""

    _libc = ctypes.CDLL(None, use_errno=True)

    def __init__(self, limits: Limits, sandbox: Sandbox) -> None:
        self.limits, self.sandbox = limits, sandbox

    def __call__(self) -> None:
        if self.sandbox.network_namespace and self._libc.unshare(_CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        limits = self.limits
        for which, value in (
            (resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1)),
            (resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes)),
            (resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes)),
            (resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files)),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(which, value)
        user = self.sandbox.user
        if user is not None:
            os.setgroups([])
            os.setresgid(user, user, user)
            os.setresuid(user, user, user)


def _why(code: int, killed: list[str], limits: Limits, stderr: bytes) -> str | None:
    """One line on why a run did not succeed (None when it exited 0 in time)."""
    if "output" in killed:
        return f"output over {limits.output_bytes} bytes: killed"
    if "time" in killed:
        return f"timed out after {limits.wall_s:g} s: killed"
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and not killed):
        return f"CPU time limit of {limits.cpu_s} s exceeded"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    if code != 0:
        lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip()[:300] if lines else f"exit status {code}"
    return None


def _candidates(python: str | None) -> Iterable[str]:
    if python:
        yield python
        return
    seen = set()
    for path in (sys.executable, shutil.which("python3"), "/usr/local/bin/python3",
                 "/usr/bin/python3"):  # fmt: skip
        if path and path not in seen and os.path.exists(path):
            seen.add(path)
            yield path
