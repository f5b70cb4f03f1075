"""Running mosquitto with docker/mosquitto.conf outside docker (for `up` and the tests)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tools import ROOT

CONF = ROOT / "docker" / "mosquitto.conf"


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broker_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_config(port: int, data_dir: Path, *, bind: str = "127.0.0.1") -> str:
    """docker/mosquitto.conf with only its listener address and persistence folder changed."""
    text = CONF.read_text()
    text, listeners = re.subn(r"^listener 1883$", f"listener {port} {bind}", text, flags=re.M)
    text, folders = re.subn(
        r"^persistence_location .*$", f"persistence_location {data_dir}/", text, flags=re.M
    )
    if listeners != 1 or folders != 1:
        raise RuntimeError(f"{CONF} lost its 'listener 1883' or 'persistence_location' line")
    return text


def _let_mosquitto_write(folder: Path) -> None:
    """Started as root, mosquitto drops to the `mosquitto` user: it must own its data folder,
    or persistence fails ("Permission denied") and a restart loses the CMS."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return  # no such user: mosquitto stays root and can write
    os.chown(folder, user.pw_uid, user.pw_gid)
    for path in folder.iterdir():
        os.chown(path, user.pw_uid, user.pw_gid)


def start_mosquitto(
    port: int, workdir: Path, *, bind: str = "127.0.0.1"
) -> subprocess.Popen[bytes]:
    """Start mosquitto on `port` with its config, data and log under `workdir`; wait for it."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise SystemExit("edgecollab: mosquitto is not installed (apt-get install mosquitto)")
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    _let_mosquitto_write(workdir / "data")
    conf = workdir / "mosquitto.conf"
    conf.write_text(local_config(port, workdir / "data", bind=bind))
    log = (workdir / "mosquitto.log").open("ab")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=log, stderr=log, start_new_session=True
    )
    deadline = time.monotonic() + 10
    while not broker_answers("127.0.0.1", port, 0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = (workdir / "mosquitto.log").read_text()[-1500:]
            raise RuntimeError(f"mosquitto did not start on port {port}:\n{tail}")
        time.sleep(0.05)
    return proc
