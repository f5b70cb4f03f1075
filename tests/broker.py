"""A real mosquitto for the tests, run with docker/mosquitto.conf on a free port."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools.common.broker import free_port, start_mosquitto

ROOT = Path(__file__).resolve().parent.parent


class Broker:
    """A mosquitto child process that can be stopped and restarted on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.host, self.port, self.workdir = "127.0.0.1", free_port(), workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_mosquitto(self.port, self.workdir)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
