"""Keeping a set of child processes running: restart with backoff, stop in order.

A child that exits is started again after 1 s, doubling to 30 s while it keeps failing
(the backoff resets once it has run for a minute); an agent's epoch rises with each start, so
the CMS sees a new life. The others keep running. `stop` ends services first (each says it is
offline), then the broker.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BACKOFF_FIRST_S, BACKOFF_MAX_S, HEALTHY_AFTER_S = 1.0, 30.0, 60.0
RETIRE_S = 5.0  # a retired child that ignores SIGTERM this long is killed


@dataclass
class Child:
    """One supervised process and how to start it again."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    broker: bool = False
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = field(default=None)

    def launch(self) -> None:
        self.proc, self.started_at, self.restart_at = self.start(), time.monotonic(), None


class Supervisor:
    """Runs children until `request_stop` or Ctrl-C; `say` prints the supervisor's lines."""

    def __init__(self, children: list[Child], *, say: Callable[[str], None]) -> None:
        self.children, self.say = children, say
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._added: list[Child] = []
        self._retired: set[str] = set()
        self._leaving: list[tuple[subprocess.Popen[bytes], float]] = []  # (process, kill at)

    def add(self, child: Child) -> None:
        """Start `child` soon and keep it running like the others."""
        with self._lock:
            self._added.append(child)

    def retire(self, name: str) -> None:
        """Stop the child called `name` soon (SIGTERM: it says offline) and not restart it."""
        with self._lock:
            self._retired.add(name)

    def request_stop(self) -> None:
        """Stop soon (from a signal handler or another thread)."""
        self._stop.set()

    def run(self, *, poll_s: float = 0.5) -> int:
        """Start every child, keep them running, stop them all on request or Ctrl-C."""
        for child in self.children:
            child.launch()
        try:
            while not self._stop.wait(poll_s):
                self._rescale(time.monotonic())
                for child in self.children:
                    self._tend(child, time.monotonic())
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        return 0

    def _rescale(self, now: float) -> None:
        with self._lock:
            added, retired = self._added, self._retired
            self._added, self._retired = [], set()
        for child in added:
            child.launch()
            self.children.append(child)
            self.say(f"{child.name} started")
        for child in [c for c in self.children if c.name in retired]:
            self.children.remove(child)
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                self._leaving.append((child.proc, now + RETIRE_S))
            self.say(f"{child.name} stopped")
        for proc, kill_at in list(self._leaving):
            if proc.poll() is not None:
                self._leaving.remove((proc, kill_at))
            elif now >= kill_at:
                proc.kill()

    def _tend(self, child: Child, now: float) -> None:
        proc = child.proc
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restarts += 1
                child.launch()
                self.say(f"{child.name} restarted (restart {child.restarts})")
            return
        if proc is None or proc.poll() is None:
            return
        if now - child.started_at >= HEALTHY_AFTER_S:
            child.backoff_s = BACKOFF_FIRST_S
        self.say(f"{child.name} exited with {proc.returncode}; restarting in {child.backoff_s:g} s")
        child.restart_at = now + child.backoff_s
        child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Services first, all at once (they say offline), the broker last."""
        for brokers in (False, True):
            group = [c.proc for c in self.children if c.broker is brokers and c.proc is not None]
            group += [] if brokers else [proc for proc, _ in self._leaving]
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for proc in group:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.say("stopped")


def relay(name: str, proc: subprocess.Popen[bytes]) -> None:
    """Prefix each line of a child's output with its name (in a daemon thread)."""

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(f"{name:>14} | {line.decode(errors='replace')}")
            sys.stdout.flush()

    threading.Thread(target=copy, daemon=True).start()
