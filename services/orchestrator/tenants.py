"""Tenants, quotas and sessions: the paper's CMS families, live.

An operator describes a tenant under `cms/tenants/<tenant>/` (only operators may write there):

- `members`: the client accounts that ask for it, e.g. `["alice", "bob"]`; a client that is in
  no tenant's list is a tenant of its own when `cms/tenants/<client>/...` exists;
- `usage_limit`: the tokens (prompt + output, edge and cloud) it may use per period:
  `{"tokens": 20000, "period_s": 3600}`, or a number (tokens a day);
- `config/model`: the model meant for it (recorded; allocation does not filter by it yet).

A query's tenant is its client's (the owner of its response topic); a query that names a tenant
(`Query.tenant`) must come from a member, or from a gateway account (the HTTP API, whose API
keys are tenants), or from anyone on a site without accounts. A tenant at its limit gets an
`Error` with code `quota` before any generation (the gateway: HTTP 429). Each orchestrator
counts what its tenants used this period under `cms/metrics/<orchestrator>/tenants`; the quota
holds against the sum over every orchestrator.
A tenant's client gets a session: `cms/sessions/<client>/tokens_used` and `.../context` (its
last turns, shortened), readable by the client itself and the orchestrators.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas import Answer, CmsEntry, Query
from services.core import cms
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import BadInput
from services.core.ownership import Accounts
from services.core.topics import CMS_KEY, METRIC

DAY_S = 86_400.0
CONTEXT_TURNS = 4  # turns kept in a session's context
CONTEXT_CHARS = 500  # of each question and answer


@dataclass(frozen=True, slots=True)
class Quota:
    tokens: int
    period_s: float


def _quota(value: object) -> Quota | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return Quota(int(value), DAY_S)
    if isinstance(value, dict) and isinstance(value.get("tokens"), int | float):
        period = value.get("period_s", DAY_S)
        if isinstance(period, int | float) and period > 0 and value["tokens"] >= 0:
            return Quota(int(value["tokens"]), float(period))
    return None


class Tenants:
    """Who a query is for, whether its tenant may still spend, and what it spent."""

    def __init__(
        self,
        bus: Bus,
        view: CmsView,
        *,
        accounts: Accounts | None = None,
        base_version: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus, self.view, self.accounts, self.clock = bus, view, accounts, clock
        self._members: dict[str, set[str]] = {}
        self._limits: dict[str, Quota] = {}
        self._described: dict[str, set[str]] = {}  # tenant → its keys in the CMS
        self._spent: dict[str, dict[str, dict[str, float]]] = {}  # scope → tenant → usage
        self._mine: dict[str, dict[str, float]] = {}  # this orchestrator's, this period
        self._sessions: dict[str, dict[str, object]] = {}
        self._version = base_version  # our entries' versions continue the agent's epoch
        view.on_change(self._on_change)

    # -- what the CMS says ----------------------------------------------------------------------

    def _on_change(self, key: str, entry: CmsEntry | None) -> None:
        levels = key.split("/")
        if len(levels) >= 4 and levels[1] == "tenants":
            self._tenant_key(levels[2], "/".join(levels[3:]), entry)
        params = METRIC.match(key)
        if params is not None and params["name"] == "tenants":
            value = entry.value if entry is not None else None
            if isinstance(value, dict):
                self._spent[params["scope"]] = {t: u for t, u in value.items() if _usage(u)}
            else:
                self._spent.pop(params["scope"], None)

    def _tenant_key(self, tenant: str, rest: str, entry: CmsEntry | None) -> None:
        keys = self._described.setdefault(tenant, set())
        if entry is None:
            keys.discard(rest)
        else:
            keys.add(rest)
        value = entry.value if entry is not None else None
        if rest == "members":
            names = value if isinstance(value, list) else []
            self._members[tenant] = {n for n in names if isinstance(n, str)}
        elif rest == "usage_limit":
            quota = _quota(value)
            if quota is None:
                self._limits.pop(tenant, None)
            else:
                self._limits[tenant] = quota

    # -- a query ------------------------------------------------------------------------------

    def tenant_of(self, client: str | None, claimed: str | None) -> str | None:
        """The tenant a query counts for (None: no tenant, no limit)."""
        if claimed is not None:
            accounts = self.accounts
            role = accounts.role(client) if accounts is not None and client is not None else None
            unsecured = accounts is not None and not accounts.known()  # a site with no accounts
            if unsecured or role == "gateway" or client in self._members.get(claimed, ()):
                return claimed
            raise BadInput("forbidden", f"{client!r} may not ask for tenant {claimed!r}")
        if client is None:
            return None
        for tenant, members in self._members.items():
            if client in members:
                return tenant
        return client if self._described.get(client) else None

    def admit(self, client: str | None, query: Query) -> str | None:
        """The query's tenant; BadInput("quota") when it may not spend `max_tokens` more."""
        tenant = self.tenant_of(client, query.tenant)
        quota = self._limits.get(tenant) if tenant is not None else None
        if tenant is None or quota is None:
            return tenant
        used = self.used(tenant, quota)
        if used + query.max_tokens > quota.tokens:
            period = self._period(quota)
            resets = (period + 1) * quota.period_s - self.clock()
            raise BadInput(
                "quota",
                f"tenant {tenant!r} used {used} of its {quota.tokens} tokens per"
                f" {quota.period_s:g} s; this query may take {query.max_tokens} more; the"
                f" period ends in {math.ceil(resets)} s",
            )
        return tenant

    def used(self, tenant: str, quota: Quota) -> int:
        """Tokens `tenant` used this period, over every orchestrator (ours counted here)."""
        period, me = self._period(quota), self.bus.client_id
        usages = [u.get(tenant) for scope, u in self._spent.items() if scope != me]
        usages.append(self._mine.get(tenant))
        return sum(
            int(u["tokens"])
            for u in usages
            if u and u.get("period") == period and u.get("period_s") == quota.period_s
        )

    def _period(self, quota: Quota) -> int:
        return int(self.clock() // quota.period_s)

    # -- what it spent --------------------------------------------------------------------------

    async def charge(self, tenant: str, client: str | None, query: Query, answer: Answer) -> None:
        """Count the answer's tokens for `tenant` (published), and note the client's turn."""
        tokens = sum(s.prompt_tokens + s.output_tokens for s in answer.steps)
        quota = self._limits.get(tenant, Quota(0, DAY_S))
        period = self._period(quota)
        usage = self._mine.get(tenant)
        if not usage or usage.get("period") != period or usage.get("period_s") != quota.period_s:
            usage = {"period": period, "period_s": quota.period_s, "tokens": 0}
        usage["tokens"] = int(usage["tokens"]) + tokens
        self._mine[tenant] = usage
        key = METRIC.format(scope=self.bus.client_id, name="tenants")
        await cms.put(self.bus, key, self._mine, version=self._next_version())
        if client is not None:
            await self._session(client, query, answer, tokens)

    async def _session(self, client: str, query: Query, answer: Answer, tokens: int) -> None:
        session = self._sessions.get(client)
        if session is None:  # what an earlier start of ours (or another orchestrator) wrote
            used = self.view.get(f"sessions/{client}/tokens_used")
            context = self.view.get(f"sessions/{client}/context")
            session = self._sessions[client] = {
                "tokens_used": used.value if used and isinstance(used.value, int) else 0,
                "context": context.value if context and isinstance(context.value, list) else [],
            }
        session["tokens_used"] = int(session["tokens_used"]) + tokens  # type: ignore[call-overload]
        turn = {"q": query.text[:CONTEXT_CHARS], "a": answer.text[:CONTEXT_CHARS]}
        turns = [*session["context"], turn][-CONTEXT_TURNS:]  # type: ignore[misc]
        session["context"] = turns
        for field in ("tokens_used", "context"):
            key = CMS_KEY.format(key=f"sessions/{client}/{field}")
            await cms.put(self.bus, key, session[field], version=self._next_version())

    def _next_version(self) -> int:
        self._version += 1
        return self._version


def _usage(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("tokens"), int | float)
