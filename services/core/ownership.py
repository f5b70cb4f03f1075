"""Who may write which CMS key: what the broker's ACLs cannot express, every CmsView checks.

The broker lets an agent write only its own entries (docker/mosquitto.conf, the ACL generated
from roles by `tools/common/security.py`), but a retained entry can also come from a replica of
another site, from an operator's mistake or from a broker run without the ACL. So a view takes
an entry only when its `origin` owns the key:

- `cms/agents/<a>` and everything under it, `cms/metrics/<a>/...`: origin `<a>` itself;
- `cms/parameters/...`, `cms/configs/...`, `cms/tenants/...`: an operator (`operator` or
  `operator-<name>`; no other account may take such a name);
- anything else: any origin (the ACL decides who may write there).
"""

from __future__ import annotations

import re

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
