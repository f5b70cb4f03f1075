"""Who may write which CMS key: what the broker's ACLs cannot express, every CmsView checks.

The broker lets an agent write only its own entries (docker/mosquitto.conf, the ACL generated
from roles by `tools/common/security.py`), but a retained entry can also come from a replica of
another site, from an operator's mistake or from a broker run without the ACL. So a view takes
an entry only when its `origin` owns the key:

- `cms/agents/<a>` and everything under it, `cms/metrics/<a>/...`: origin `<a>` itself;
- `cms/parameters/...`, `cms/configs/...`, `cms/tenants/...`: an operator (`operator` or
  `operator-<name>`; no other account may take such a name);
- anything else: any origin (the ACL decides who may write there).

And a card's kind must be its account's role where the view knows the site's accounts
(`Accounts`: `<state dir>/security/accounts.json`, names and roles, no secrets): a device's
account may publish its own card, but not one that says it is a worker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

OPERATOR_ID_PATTERN = r"^operator(-[a-z0-9][a-z0-9-]{0,52})?$"
OPERATOR_FAMILIES = ("parameters", "configs", "tenants")
_OPERATOR = re.compile(OPERATOR_ID_PATTERN)
_SELF_OWNED = ("agents", "metrics")  # cms/<family>/<owner>/...


def is_operator(name: str) -> bool:
    return _OPERATOR.match(name) is not None


def owner_problem(key: str, origin: str) -> str | None:
    """Why `origin` may not write the CMS key `key` (None: it may)."""
    levels = key.split("/")
    family = levels[1] if len(levels) > 1 else ""
    if family in _SELF_OWNED and len(levels) > 2 and origin != levels[2]:
        return f"{key} belongs to {levels[2]!r}, not to its origin {origin!r}"
    if family in OPERATOR_FAMILIES and not is_operator(origin):
        return f"only an operator writes cms/{family}/..., not {origin!r}"
    return None


class Accounts:
    """This site's accounts and their roles, read from `accounts.json` (re-read when it
    changes); an account it does not list (another site's, say) is not judged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: float | None = None
        self._roles: dict[str, str] = {}

    @classmethod
    def of_state_dir(cls, state_dir: Path) -> Accounts:
        return cls(state_dir / "security" / "accounts.json")

    def known(self) -> bool:
        """Whether this site has accounts at all (a broker run without security has none)."""
        return self.path.exists()

    def role(self, name: str) -> str | None:
        try:
            stamp = self.path.stat().st_mtime
        except OSError:
            return None
        if stamp != self._stamp:
            try:
                roles = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return self._roles.get(name)
            self._roles = (
                {str(k): str(v) for k, v in roles.items()} if isinstance(roles, dict) else {}
            )
            self._stamp = stamp
        return self._roles.get(name)

    def kind_problem(self, agent: str, kind: object) -> str | None:
        """Why `agent`'s card may not say `kind` (None: it may, or the account is unknown)."""
        role = self.role(agent)
        if role is None or role == kind:
            return None
        return f"{agent}'s account is a {role}, its card says {kind!r}"
