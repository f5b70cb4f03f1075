"""Running mosquitto with docker/mosquitto.conf outside docker (for `up`, benches and tests)."""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from services.core.settings import MqttSettings
from tools import ROOT
from tools.common.credentials import Credentials, stack_identities
from tools.common.security import Identity, Role

CONF = ROOT / "docker" / "mosquitto.conf"
PID_FILE = "mosquitto.pid"  # in the broker's folder: `edgecollab credentials add` reloads it
PLAIN, TLS, CERT = 1883, 8883, 8884  # the listeners of docker/mosquitto.conf


LOWEST_PORT = 20_000
EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A TCP port free on this machine now, below the kernel's ephemeral range: a port the
    kernel handed out (bind to 0) can be taken by any outgoing connection's local end before
    the broker binds it (seen: "Address already in use" under a loaded test run)."""
    try:
        below = int(EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        below = 32768
    for _ in range(100):
        port = random.randrange(LOWEST_PORT, max(below, LOWEST_PORT + 1000))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket() as sock:  # every one tried is taken: any free port
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_config(
    port: int,
    data_dir: Path,
    *,
    security_dir: Path = Path("/mosquitto/security"),
    bind: str = "127.0.0.1",
    tls_port: int | None = None,
    cert_port: int | None = None,
    tls_bind: str = "127.0.0.1",
    secure: bool = True,
) -> str:
    """docker/mosquitto.conf with only its listeners (plain on `bind`, the TLS ones on
    `tls_bind`, or left out), persistence folder and security folder changed. `secure=False`
    (benchmarks' baseline only): anonymous, no ACL, no TLS, as before security."""
    if not secure:
        tls_port = cert_port = None
    addresses = {PLAIN: f"{port} {bind}", TLS: tls_port, CERT: cert_port}
    paragraphs = []
    for paragraph in CONF.read_text().split("\n\n"):
        listener = re.search(r"^listener (\d+)$", paragraph, flags=re.M)
        if listener:
            number = int(listener.group(1))
            address = addresses.pop(number, None)
            if address is None:
                continue  # this listener is not wanted here
            if number != PLAIN:
                address = f"{address} {tls_bind}"
            paragraph = paragraph.replace(listener.group(0), f"listener {address}")
        paragraphs.append(paragraph)
    text, folders = re.subn(
        r"^persistence_location .*$",
        f"persistence_location {data_dir}/",
        "\n\n".join(paragraphs),
        flags=re.M,
    )
    if PLAIN in addresses or folders != 1 or "/mosquitto/security/" not in text:
        raise RuntimeError(f"{CONF} lost its 'listener 1883', persistence or security lines")
    text = text.replace("/mosquitto/security/", f"{security_dir}/")
    if not secure:
        insecure = ("password_file ", "acl_file ", "use_username_as_clientid ")
        lines = [line for line in text.splitlines() if not line.startswith(insecure)]
        text = "\n".join(lines).replace("allow_anonymous false", "allow_anonymous true") + "\n"
    if os.geteuid() == 0:  # else mosquitto becomes user mosquitto, who cannot read our 0600 files
        text += f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
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
    port: int,
    workdir: Path,
    *,
    security_dir: Path,
    bind: str = "127.0.0.1",
    tls_port: int | None = None,
    cert_port: int | None = None,
    tls_bind: str = "127.0.0.1",
    secure: bool = True,
) -> subprocess.Popen[bytes]:
    """Start mosquitto on `port` (and the TLS ports given) with its config, data and log under
    `workdir` and its accounts in `security_dir` (`Credentials`); wait until it listens."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise SystemExit("edgecollab: mosquitto is not installed (apt-get install mosquitto)")
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    _let_mosquitto_write(workdir / "data")
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        local_config(
            port,
            workdir / "data",
            security_dir=security_dir,
            bind=bind,
            tls_port=tls_port,
            cert_port=cert_port,
            tls_bind=tls_bind,
            secure=secure,
        )
    )
    log = (workdir / "mosquitto.log").open("ab")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=log, stderr=log, start_new_session=True
    )
    deadline = time.monotonic() + 10
    ports = [p for p in (port, tls_port, cert_port) if p is not None]
    while not all(broker_answers("127.0.0.1", p, 0.2) for p in ports):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = (workdir / "mosquitto.log").read_text()[-1500:]
            raise RuntimeError(f"mosquitto did not start on port {port}:\n{tail}")
        time.sleep(0.05)
    (workdir / PID_FILE).write_text(f"{proc.pid}\n")
    return proc


def reload_broker(workdir: Path) -> bool:
    """Tell the mosquitto `start_mosquitto` ran in `workdir` to reload its password and ACL
    files (SIGHUP); False when none runs there."""
    try:
        pid = int((workdir / PID_FILE).read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if str(workdir / "mosquitto.conf").encode() not in command:
            return False  # a stale pid file: that process is not our broker
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True


class LocalBroker:
    """A private mosquitto on free ports (benchmarks, tests), secure as `edgecollab up` runs
    it: its accounts in `workdir/security`, made on demand by `login`."""

    def __init__(self, workdir: Path, *, secure: bool = True) -> None:
        self.workdir, self.secure, self.host = workdir, secure, "127.0.0.1"
        self.port, self.tls_port, self.cert_port = free_port(), free_port(), free_port()
        self.credentials = Credentials.of_state_dir(workdir)
        if secure:
            self.credentials.add(stack_identities())  # the CLI's operator accounts, observer
            self.credentials.ensure_tls()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def anonymous(self) -> MqttSettings:
        return MqttSettings(host=self.host, port=self.port)

    def start(self) -> None:
        self.proc = start_mosquitto(
            self.port,
            self.workdir,
            security_dir=self.credentials.root,
            tls_port=self.tls_port if self.secure else None,
            cert_port=self.cert_port if self.secure else None,
            secure=self.secure,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def login(self, name: str, role: str = "client", *, tls: bool = False) -> MqttSettings:
        """Settings for account `name` (made with `role` if new: the running broker reloads
        and is waited for until it takes it), over plain MQTT or TLS. Without security:
        anonymous settings."""
        if not self.secure:
            return self.anonymous
        made = self.credentials.add([Identity(name, Role(role))])
        if Role(role) is Role.operator and not self.credentials.hold(name):
            raise RuntimeError(f"operator account {name} is held by another process")
        settings = self.credentials.settings(name, self.anonymous)
        if tls:
            settings = settings.model_copy(
                update={"port": self.tls_port, "tls_ca": self.credentials.ca}
            )
        if made and self.proc is not None:
            reload_broker(self.workdir)
            until_accepted(settings)
        return settings


def until_accepted(settings: MqttSettings, timeout: float = 10.0) -> None:
    """Return once the broker takes the account (a reload is asynchronous). Attempts connect
    with the account's own client id: call it before anything else connects as the account."""
    give_up = time.monotonic() + timeout
    while not accepted(settings):
        if time.monotonic() > give_up:
            raise TimeoutError(f"the broker did not take account {settings.username!r}")


def accepted(settings: MqttSettings) -> bool:
    """One connect attempt: did the broker answer CONNACK success?"""
    result: list[bool] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.secret())
    if settings.uses_tls:
        client.tls_set_context(settings.tls_context())
    client.on_connect = lambda _c, _u, _f, reason, _p: result.append(not reason.is_failure)
    try:
        client.connect(settings.host, settings.port)
        deadline = time.monotonic() + 2
        while not result and time.monotonic() < deadline:
            client.loop(timeout=0.05)
    except OSError:
        return False
    finally:
        client.disconnect()
    return bool(result and result[0])
