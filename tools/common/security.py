"""Who may say what on the bus: roles, and the broker files made from them (pure functions).

Every agent, client and device has its own account; the broker takes the username as the
client id (`use_username_as_clientid`), so an account can neither take another's id nor kick
it off. `acl(identities)` turns the accounts' roles into mosquitto's ACL file; the topics come
from the topic table (`services/core/topics.py`). What an ACL cannot check (that an entry's
origin owns its key, the bounds of a live parameter) the services check
(`services/core/ownership.py`, `services/worker/parameters.py`).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from schemas.ids import AGENT_ID_PATTERN
from services.core.ownership import OPERATOR_FAMILIES, is_operator
from services.core.topics import (
    AGENT_CARD,
    ARITHMETIC,
    CACHE,
    CLASSIFY,
    CMS_ALL,
    EMBED,
    EMBEDDING,
    ERRORS,
    FINETUNE,
    INFERENCE_STATE,
    KB_CHECK,
    KB_DOCUMENTS,
    KB_RETRIEVE,
    KNOWLEDGE,
    METRIC,
    MODEL_DETAIL,
    QUERIES,
    READING,
    REMOTE_TASKS,
    REPLICA_CHANGES,
    REPLIES,
    SENSOR_ASK,
    SITE_KEY,
    STREAM,
    TASKS,
    TOMBSTONE,
    Topic,
)


class Role(StrEnum):
    """What an account is for; each role's topics are in `grants`."""

    orchestrator = "orchestrator"
    classifier = "classifier"
    worker = "worker"
    sensor = "sensor"  # a device: simulated or real
    client = "client"  # asks questions (the CLI off the box, an application)
    gateway = "gateway"  # the HTTP API: a client for many users
    operator = "operator"  # the CLI on the box: parameters, configs, tenants
    observer = "observer"  # reads everything, writes nothing: mosquitto_sub debugging
    replicator = "replicator"  # copies cms/ between sites
    peer = "peer"  # another site's replicator on this broker: peer-<site>
    sandbox = "sandbox"  # the calculator peer: runs programs (knowledge/arithmetic/run)
    kb = "kb"  # a domain's knowledge base: retrieval and documents (knowledge/<domain>/...)
    bench = "bench"  # benchmarks' bare ping-pongs (bench/#) and their load


@dataclass(frozen=True, order=True)
class Identity:
    """One account: its name is the username and the client id."""

    name: str
    role: Role

    def __post_init__(self) -> None:
        if not re.match(AGENT_ID_PATTERN, self.name):
            raise ValueError(f"account name {self.name!r} must match {AGENT_ID_PATTERN}")
        if is_operator(self.name) != (self.role is Role.operator):
            raise ValueError(
                f"{self.name!r}: operator accounts, and only they, are named operator[-<name>]"
            )
        if self.name.startswith(PEER_PREFIX) != (self.role is Role.peer):
            raise ValueError(f"{self.name!r}: peer accounts, and only they, are named peer-<site>")

    @property
    def site(self) -> str:
        """A peer account's site: what it may publish under replication/from/<site>/."""
        return self.name.removeprefix(PEER_PREFIX)


PEER_PREFIX = "peer-"  # the client id of a replicator's link to another site's broker


def peer_account(site: str) -> Identity:
    """The account site `site`'s replicator connects to a peer's broker as."""
    return Identity(f"{PEER_PREFIX}{site}", Role.peer)


def _subtree(topic_filter: str) -> str:
    """A filter and every level below it ('#' also matches the level itself)."""
    return topic_filter if topic_filter.endswith("#") else f"{topic_filter}/#"


def _family(topic: Topic[Any], **fixed: str) -> str:
    """`topic`'s levels up to its first free placeholder, and everything below them."""
    levels = topic.filter(**fixed).split("/")
    return _subtree("/".join(itertools.takewhile(lambda level: level not in "+#", levels)))


def _cms(family: str) -> str:
    return f"cms/{family}/#"


# Readable by every account that keeps a CMS view: what agents are and how they are set up.
# Not cms/inference (task outputs), cms/cache (answers), cms/sessions, cms/tenants.
CMS_PUBLIC = tuple(
    _cms(f) for f in ("agents", "slm", "parameters", "configs", "metrics", "scaling", "experiments")
)
# What a replicator writes into its site's CMS: other sites' entries, the shared families
# (services/replicator/rules.py), its links' state; never another agent's cms/agents/<a>.
REPLICATED = (_family(SITE_KEY), *(_cms(f) for f in ("slm", "finetune", "sessions")))
REPLICATED += (*(_cms(f) for f in OPERATOR_FAMILIES), _cms("replication"))
# Every account's own inbox and streams, and its own session (patterns: %u is the username).
OWN = (
    ("readwrite", _subtree(REPLIES.format(client="%u"))),
    ("read", _family(STREAM, client="%u")),
    ("read", _cms("sessions/%u")),
)
ANSWER_ANYONE = REPLIES.filter()  # responders answer on the requester's reply topic
REPORT = ERRORS.filter()


def grants(identity: Identity) -> list[tuple[str, str]]:
    """(access, topic filter) pairs for one account, beyond the patterns in OWN."""
    me, role = identity.name, identity.role
    own_entries = ("write", _subtree(AGENT_CARD.format(agent=me)))  # card, status, and below
    agent = [("read", f) for f in CMS_PUBLIC] + [own_entries, ("write", ANSWER_ANYONE)]
    asks = ("write", _subtree(QUERIES.filter()))
    reports = ("write", REPORT)
    if role is Role.orchestrator:
        return [
            ("read", CMS_ALL),
            ("read", "data/#"),
            ("read", _subtree(QUERIES.filter())),
            ("read", _family(STREAM)),  # what its streamed queries' requesters were sent
            own_entries,
            ("write", _family(METRIC, scope=me)),  # its requests, its tenants' usage
            ("write", _family(INFERENCE_STATE)),
            ("write", _family(CACHE)),
            ("write", _cms("sessions")),
            ("write", _subtree(CLASSIFY.filter())),
            ("write", _family(TASKS)),
            ("write", _family(REMOTE_TASKS)),  # a neighbour site's worker, via the replicator
            ("write", _family(KNOWLEDGE)),  # experts' questions and sensors' (knowledge/#)
            ("write", ANSWER_ANYONE),
            reports,
        ]
    embeds = ("write", _subtree(EMBED.filter()))  # the site's one MiniLM, the classifier's
    if role is Role.classifier:
        return [
            *agent,
            ("read", _subtree(CLASSIFY.filter())),
            ("read", _subtree(EMBED.filter())),
            reports,
        ]
    if role is Role.worker:
        return [
            *agent,
            ("read", _family(TASKS, agent=me)),
            ("read", _subtree(KNOWLEDGE.filter())),
            ("write", _family(MODEL_DETAIL)),
            ("write", _family(METRIC, scope=me)),  # its inference time, tokens used
            ("write", _family(STREAM)),
            reports,
        ]
    if role is Role.sensor:
        return [
            ("read", _subtree(AGENT_CARD.format(agent=me))),  # its own card: the next epoch
            own_entries,
            ("read", _subtree(SENSOR_ASK.filter(agent=me))),
            ("write", READING.filter(agent=me)),
            ("write", EMBEDDING.filter(agent=me)),
            ("write", ANSWER_ANYONE),
            reports,
        ]
    if role is Role.client:
        return [*(("read", f) for f in CMS_PUBLIC), asks, reports]
    if role is Role.gateway:  # a client for many users (its API keys' tenants) with a card
        return [*agent, ("read", _cms("tenants")), asks, embeds, reports]
    if role is Role.sandbox:
        return [*agent, ("read", _subtree(ARITHMETIC.filter())), reports]
    if role is Role.kb:
        inbox = [("read", _subtree(t.filter())) for t in (KB_RETRIEVE, KB_DOCUMENTS, KB_CHECK)]
        return [*agent, *inbox, ("write", _family(FINETUNE)), embeds, reports]
    if role is Role.operator:
        families = (*OPERATOR_FAMILIES, "finetune", "scaling", "experiments")
        writes = [("write", _cms(f)) for f in families]
        read_all = [("read", f) for f in (CMS_ALL, "data/#", _family(ERRORS))]
        # `edgecollab kb add|search|check`: its documents, retrieval and lexicon; a domain
        kb = [
            ("write", _subtree(t.filter())) for t in (KB_RETRIEVE, KB_DOCUMENTS, KB_CHECK, CLASSIFY)
        ]
        return [*read_all, *writes, *kb, embeds, asks, reports]
    if role is Role.observer:
        return [("read", "#"), ("read", "$SYS/#")]
    if role is Role.replicator:
        return [
            ("read", CMS_ALL),
            own_entries,
            *(("write", f) for f in REPLICATED),
            ("read", "replication/#"),  # peers' changes, digests, wants; its tombstones
            ("read", _subtree(REMOTE_TASKS.filter())),  # tasks for a neighbour site's workers
            ("write", _family(TOMBSTONE)),
            ("write", ANSWER_ANYONE),
            reports,
        ]
    if role is Role.peer:  # publishes only as its own site, into this site's replicator
        own = REPLICA_CHANGES.filter(site=identity.site).rsplit("/", 1)[0]
        return [("write", _subtree(own)), ("write", _family(TASKS))]  # and tasks for our workers
    if role is Role.bench:
        return [
            ("readwrite", "bench/#"),
            ("read", "data/#"),
            *(("read", f) for f in CMS_PUBLIC),
            asks,
            reports,
        ]
    raise AssertionError(f"no grants for role {role}")


def acl(identities: Iterable[Identity]) -> str:
    """mosquitto's ACL file for these accounts (a pure function of their roles)."""
    lines = [
        "# Generated by edgecollab from the accounts' roles (tools/common/security.py);",
        "# `edgecollab credentials add` rewrites it. Anything not granted here is denied.",
        "",
        "# Every account: its own reply topic, the streams of its requests, its session.",
        *(f"pattern {access} {topic}" for access, topic in OWN),
    ]
    for identity in sorted(set(identities)):
        lines += ["", f"# {identity.role}", f"user {identity.name}"]
        lines += [f"topic {access} {topic}" for access, topic in grants(identity)]
    return "\n".join(lines) + "\n"


PBKDF2_ITERATIONS = 101  # mosquitto_passwd's; secrets are 256 random bits, not passwords


def password_line(username: str, secret: str, *, salt: bytes | None = None) -> str:
    """One line of a mosquitto 2 password file: PBKDF2-SHA512, as `mosquitto_passwd` writes."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, PBKDF2_ITERATIONS)
    encoded = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"{username}:$7${PBKDF2_ITERATIONS}${encoded[0]}${encoded[1]}"


def new_secret() -> str:
    """A fresh account secret: 256 random bits, URL-safe text."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
