"""What replicates, and under which name: rules by CMS topic filter, and the key map.

A rule's `scope` says what a key under its filter is across sites:
- `shared`: one key for every site (`cms/parameters/m/temperature` is the same key everywhere);
  any site may write it, and concurrent writes merge by (version, origin).
- `site`: this site's own entry (its agents, its metrics), shown at every other site under
  `cms/sites/<this site>/...`, so that two sites' `worker-1` never collide and a site's own
  `cms/agents/` lists only the agents it can reach. The owning site is the only writer, and its
  state is the truth: a peer holds what the owner last said, and drops what the owner lacks.
- `local`: not replicated (task state, cache: they expire in seconds to minutes).

`min_interval_s` summarises a volatile key: its changes leave for the peers at most once per
interval (the latest one), e.g. agent statuses that change several times a second.
The first matching rule decides; a key no rule matches stays local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from paho.mqtt.client import topic_matches_sub
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.core.topics import CMS_KEY, BadTopic

Scope = Literal["shared", "site", "local"]
SITES = "sites"  # the reserved first level of other sites' entries


class Rule(BaseModel):
    """Keys matching `filter` (an MQTT filter below cms/, e.g. `parameters/#`) have `scope`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filter: str = Field(min_length=1)
    scope: Scope
    min_interval_s: float = Field(0.0, ge=0, description="summarise: one push per interval")

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: str) -> str:
        levels = value.split("/")
        if levels[0] == SITES:
            raise ValueError("cms/sites/ is the replicator's own: no rule may name it")
        if any(not level for level in levels) or "#" in levels[:-1]:
            raise ValueError(f"{value!r} is not an MQTT topic filter")
        if any(("#" in lv or "+" in lv) and lv not in ("#", "+") for lv in levels):
            raise ValueError(f"{value!r}: a wildcard must be a whole level")
        return value


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(filter="replication/#", scope="local"),  # the replicator's own link entries
    Rule(filter="inference/#", scope="local"),  # a request's task state (expires in minutes)
    Rule(filter="cache/#", scope="local"),  # carries an MQTT expiry
    Rule(filter="agents/+/status", scope="site", min_interval_s=5.0),
    Rule(filter="agents/+", scope="site"),
    Rule(filter="metrics/#", scope="site", min_interval_s=10.0),
    Rule(filter="scaling/#", scope="site"),
    Rule(filter="slm/#", scope="shared"),
    Rule(filter="parameters/#", scope="shared"),
    Rule(filter="configs/#", scope="shared"),
    Rule(filter="finetune/#", scope="shared"),
    Rule(filter="tenants/#", scope="shared"),
    Rule(filter="sessions/#", scope="shared"),
)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a local CMS topic sits across sites."""

    key: str  # the key as every site names it
    owner: str | None  # the site whose entry it is; None for a shared key
    rule: Rule | None  # None for another site's entry


class KeyMap:
    """Local CMS topics ↔ keys as all sites name them, for one site."""

    def __init__(self, site: str, rules: tuple[Rule, ...] | list[Rule]) -> None:
        self.site = site
        self.rules = tuple(rules)

    def rule_for(self, rest: str) -> Rule | None:
        """The first rule matching a key below cms/ (None: no rule, so local)."""
        return next((r for r in self.rules if topic_matches_sub(r.filter, rest)), None)

    def from_local(self, topic: str) -> Placement | None:
        """Where a local `cms/...` topic replicates to; None when it stays here."""
        rest = topic.removeprefix("cms/")
        if rest == topic:
            return None
        levels = rest.split("/", 2)
        if levels[0] == SITES:
            if len(levels) < 3 or levels[1] == self.site:
                return None  # not a key of the scheme; the replicator refuses it
            return Placement(rest, levels[1], None)
        rule = self.rule_for(rest)
        if rule is None or rule.scope == "local":
            return None
        if rule.scope == "site":
            return Placement(f"{SITES}/{self.site}/{rest}", self.site, rule)
        return Placement(rest, None, rule)

    def to_local(self, key: str) -> str:
        """The local topic of a key: this site's own entries lose their `sites/<site>/`."""
        own = f"{SITES}/{self.site}/"
        return "cms/" + (key.removeprefix(own) if key.startswith(own) else key)

    @staticmethod
    def owner(key: str) -> str | None:
        levels = key.split("/", 2)
        return levels[1] if levels[0] == SITES and len(levels) == 3 else None

    def accepts(self, key: str, sender: str) -> bool:
        """May `sender` tell us about `key`? Another site's entries only from that site; a
        shared key only if it is shared here too (else a local change of it would never leave,
        and the sites would disagree). Checks the key is a valid CMS topic here as well."""
        owner = self.owner(key)
        if owner is not None:
            if owner != sender:
                return False
        else:
            rule = self.rule_for(key)
            if rule is None or rule.scope != "shared" or key.startswith(SITES + "/"):
                return False
        try:
            CMS_KEY.at(self.to_local(key))
        except BadTopic:
            return False
        return True
