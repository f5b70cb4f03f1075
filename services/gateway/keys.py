"""API keys of the gateway: each key maps to a tenant.

A key file holds one key per line, optionally followed by its tenant (`KEY` or `KEY TENANT`;
blank lines and `#` comments are skipped); a key without a tenant belongs to `default`. The
default tenant's key is generated with `secrets` on first start and written with mode 0600.
Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from pathlib import Path

from services.core.errors import ConfigError

DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # a CMS key level: cms/tenants/<t>/...
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")


def new_key() -> str:
    return "ec-" + secrets.token_urlsafe(32)


def ensure_key_file(path: Path) -> str:
    """The first key in `path`; a new key written there (mode 0600) when there is no file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        keys = read_key_file(path)
        if not keys:
            raise ConfigError(f"{path} holds no API key") from None
        return next(iter(keys))
    except OSError as exc:
        raise ConfigError(f"cannot create the API key file {path}: {exc.strerror}") from None
    key = new_key()
    with os.fdopen(fd, "w") as file:
        file.write(f"{key} {DEFAULT_TENANT}\n")
    return key


def read_key_file(path: Path) -> dict[str, str]:
    """{key: tenant} from a key file; a malformed line is a ConfigError naming its number."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc.strerror}") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ConfigError(f"{path}:{number}: want 'KEY' or 'KEY TENANT'")
        keys[fields[0]] = fields[1] if len(fields) == 2 else DEFAULT_TENANT
    return check_keys(keys, str(path))


def check_keys(keys: dict[str, str], where: str) -> dict[str, str]:
    """Keys of 16-256 URL-safe characters; tenants that can be a CMS key level."""
    for key, tenant in keys.items():
        if not _KEY_PATTERN.match(key):
            raise ConfigError(f"{where}: an API key must be 16-256 URL-safe characters")
        if not TENANT_PATTERN.match(tenant):
            raise ConfigError(f"{where}: tenant {tenant!r} must match {TENANT_PATTERN.pattern}")
    return keys


class KeyRing:
    """Which tenant an API key belongs to."""

    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = dict(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def tenant(self, key: str) -> str | None:
        """The key's tenant, or None; every key is compared, in constant time."""
        found = None
        for known, tenant in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                found = tenant
        return found
