"""Accounts on disk: secrets, the broker's password and ACL files, and TLS material.

    <state dir>/security/            (0700; every file in it 0600 but the certificates)
      accounts.json                  account → role; no secrets (0644: services judge cards)
      secrets/<account>              its secret: a service's EDGECOLLAB_MQTT_PASSWORD_FILE
      passwd, acl                    mosquitto's password_file and acl_file, made from the two
      tls/ca.crt, ca.key, server.*   the local CA and the broker's certificate (docker/certs.sh)
      observer/mosquitto_sub         mosquitto_sub's options for the observer account
      seats/operator-<n>.lock        which operator account a CLI process on this box holds

Secrets are written only here: never to a log, the CMS, an argument list or an environment
variable (the services get the *path* of their secret file).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from services.core.settings import MqttSettings
from tools import ROOT
from tools.common.security import Identity, Role, acl, new_secret, password_line
from tools.common.stack import STACK, ServiceSpec

OPERATOR_SEATS = 8  # CLI commands on the stack's box at once, each with its own client id
OBSERVER = "observer"
CERTS_SCRIPT = ROOT / "docker" / "certs.sh"


def stack_identities(
    specs: Sequence[ServiceSpec] = (), seats: int = OPERATOR_SEATS
) -> list[Identity]:
    """The accounts of the default stack: every service of STACK (and of `specs`: more
    workers, say), the operator seats of the CLI on this box, and the observer."""
    services = {spec.agent: spec for spec in (*STACK, *specs)}
    return [
        *(Identity(spec.agent, Role(spec.role)) for spec in services.values()),
        *(Identity(f"operator-{n}", Role.operator) for n in range(1, seats + 1)),
        Identity(OBSERVER, Role.observer),
    ]


class Credentials:
    """The accounts kept in one folder (see the module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of_state_dir(cls, state_dir: Path) -> Credentials:
        return cls(state_dir / "security")

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def ca(self) -> Path:
        return self.tls_dir / "ca.crt"

    def exists(self) -> bool:
        return (self.root / "accounts.json").exists()

    def accounts(self) -> dict[str, Role]:
        try:
            raw = json.loads((self.root / "accounts.json").read_text())
        except FileNotFoundError:
            return {}
        return {name: Role(role) for name, role in raw.items()}

    def secret_file(self, name: str) -> Path:
        return self.root / "secrets" / name

    def settings(self, name: str, base: MqttSettings | None = None) -> MqttSettings:
        """`base` (host, port, TLS) connecting as account `name`."""
        if name not in self.accounts():
            raise KeyError(f"no account {name!r} in {self.root}")
        update = {"username": name, "password": None, "password_file": self.secret_file(name)}
        return (base or MqttSettings()).model_copy(update=update)

    # -- making accounts ------------------------------------------------------------------------

    def add(
        self,
        identities: Iterable[Identity],
        *,
        rotate: bool = False,
        secrets: dict[str, str] | None = None,
    ) -> list[str]:
        """Create the accounts that are missing (and new secrets for all with `rotate`);
        rewrite the broker's files. Returns the names given a new secret. A name taken by
        another role is an error. `secrets`: what some of them must be (another site's peer
        account: the secret that site made for it)."""
        wanted, secrets = list(identities), secrets or {}
        with self._locked():
            accounts = self.accounts()
            for identity in wanted:
                role = accounts.get(identity.name)
                if role is not None and role is not identity.role:
                    raise ValueError(f"account {identity.name!r} exists with role {role}")
            fresh = []
            for identity in wanted:
                path = self.secret_file(identity.name)
                given = secrets.get(identity.name)
                if given is not None and (
                    not path.exists() or self._secret(identity.name) != given
                ):
                    _write_private(path, given + "\n")
                    fresh.append(identity.name)
                elif rotate or identity.name not in accounts or not path.exists():
                    _write_private(path, new_secret() + "\n")
                    fresh.append(identity.name)
                accounts[identity.name] = identity.role
            if fresh or not (self.root / "acl").exists():
                roles = json.dumps(dict(sorted(accounts.items())), indent=2) + "\n"
                _write_private(self.root / "accounts.json", roles, mode=0o644)  # no secrets
                self._write_broker_files(accounts)
        return fresh

    def _write_broker_files(self, accounts: dict[str, Role]) -> None:
        identities = [Identity(name, role) for name, role in accounts.items()]
        lines = [password_line(i.name, self._secret(i.name)) for i in sorted(identities)]
        _write_private(self.root / "passwd", "\n".join(lines) + "\n")
        _write_private(self.root / "acl", acl(identities))
        if accounts.get(OBSERVER) is Role.observer:  # `XDG_CONFIG_HOME=<this> mosquitto_sub ...`
            options = f"-u {OBSERVER}\n-P {self._secret(OBSERVER)}\n"
            _write_private(self.root / "observer" / "mosquitto_sub", options)

    def _secret(self, name: str) -> str:
        return self.secret_file(name).read_text().strip()

    def ensure_tls(self, names: Iterable[str] = ()) -> None:
        """The local CA and the broker's certificate, made by docker/certs.sh if missing."""
        if (self.tls_dir / "server.crt").exists() and (self.tls_dir / "server.key").exists():
            return
        script = CERTS_SCRIPT if CERTS_SCRIPT.exists() else shutil.which("edgecollab-certs")
        if script is None or shutil.which("openssl") is None:
            raise SystemExit("edgecollab: TLS certificates need openssl and docker/certs.sh")
        with self._locked():
            subprocess.run(
                ["bash", str(script), str(self.tls_dir), *names],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def chown(self, *, broker: int, services: int) -> None:
        """Compose: the broker's files to mosquitto's user, the secrets to the services'."""
        for path in (self.root / "passwd", self.root / "acl", *self.tls_dir.glob("server.*")):
            os.chown(path, broker, broker)
        for path in (self.root / "secrets").iterdir():
            os.chown(path, services, services)
        for folder in (self.root, self.root / "secrets", self.tls_dir):
            folder.chmod(0o711)  # enter, not list: each reads only the files it owns

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- the CLI on this box ------------------------------------------------------------------

    def operator_seat(self) -> str | None:
        """The first operator account no other process on this box holds now, held until
        this process exits (one client id per connection: two CLI commands at once would
        otherwise kick each other off). None when there are no operator accounts here."""
        seats = sorted(n for n, r in self.accounts().items() if r is Role.operator)
        for name in seats:
            if self._seat(name) not in _HELD and self.hold(name):  # a seat per connection
                return name
        if seats:
            raise SystemExit(f"edgecollab: all {len(seats)} operator accounts are in use here")
        return None

    def hold(self, name: str) -> bool:
        """Hold operator account `name`'s seat until this process exits (False: another
        process holds it), so that `operator_seat` gives it to no CLI command meanwhile."""
        seat = self._seat(name)
        if seat in _HELD:
            return True
        seat.parent.mkdir(mode=0o700, exist_ok=True)
        handle = seat.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        _HELD[seat] = handle
        return True

    def _seat(self, name: str) -> Path:
        return self.root / "seats" / f"{name}.lock"


_HELD: dict[Path, IO[str]] = {}  # the seat locks this process holds (released at exit)


def _write_private(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Write a file only its owner may read (unless `mode` says otherwise), atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)
