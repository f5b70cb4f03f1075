"""Every topic of the bus, declared once and bound to its payload model, QoS and retain flag.

Templates name whole levels in braces (`computation/tasks/{agent}`); a last level `{name*}`
stands for one or more levels (a CMS key). They compile to `+`/`#` filters and are checked when
declared. `format` and `at` give an `Address`: the concrete topic, still bound to its `Topic`, so
`Bus.publish` and `Bus.request` take their payload type, QoS, retain flag and reply models from
this table and nowhere else. No other module writes topic strings by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from schemas import (
    Accepted,
    Answer,
    Check,
    Checked,
    Classification,
    ClassifyRequest,
    CmsEntry,
    Embed,
    EmbeddingRecord,
    Embeddings,
    Error,
    KbDocument,
    KbJob,
    KnowledgeAnswer,
    KnowledgeQuery,
    Message,
    Passages,
    ProgramResult,
    ProgramRun,
    Query,
    Reading,
    Rejected,
    ReplicaChanges,
    ReplicaDigest,
    ReplicaVersions,
    ReplicaWant,
    Retrieve,
    Task,
    TaskResult,
    TokenChunk,
    Tombstone,
)

M = TypeVar("M", bound=Message)

_PLACEHOLDER = re.compile(r"^\{([a-z_]+)(\*?)\}$")
_BAD_LEVEL_CHARS = re.compile(r"[+#/\x00]")
MAX_TOPIC_CHARS = 1024  # far below MQTT's 65,535 bytes; a longer key is a mistake or an attack


class BadTopic(ValueError):
    """A concrete topic that is not an instance of its template (or not a topic at all)."""


class Address(str, Generic[M]):
    """A concrete topic name that remembers the `Topic` it is an instance of."""

    topic: Topic[M]

    def __new__(cls, name: str, topic: Topic[M]) -> Address[M]:
        address = super().__new__(cls, name)
        address.topic = topic
        return address


@dataclass(frozen=True)
class Topic(Generic[M]):
    """A topic template bound to the model published there (and the models of its replies)."""

    template: str
    payload: type[M]
    replies: tuple[type[Message], ...] = ()
    retained: bool = False
    qos: Literal[0, 1] = 1
    params: tuple[str, ...] = field(init=False)
    _rest: str | None = field(init=False, default=None)  # the `{name*}` level's name

    def __post_init__(self) -> None:
        names, levels = [], self.template.split("/")
        for i, level in enumerate(levels):
            match = _PLACEHOLDER.match(level)
            if match and match.group(2) and i != len(levels) - 1:
                raise ValueError(f"bad topic template {self.template!r}: {level!r} must be last")
            if match:
                names.append(match.group(1))
                if match.group(2):
                    object.__setattr__(self, "_rest", match.group(1))
            elif not level or "{" in level or _BAD_LEVEL_CHARS.search(level):
                raise ValueError(f"bad topic template {self.template!r}: level {level!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"repeated placeholder in {self.template!r}")
        object.__setattr__(self, "params", tuple(names))

    def format(self, **values: str) -> Address[M]:
        """The concrete topic; each value must be one non-empty level (the `*` one: levels)."""
        if set(values) != set(self.params):
            raise BadTopic(f"{self.template!r} needs {self.params}, got {sorted(values)}")
        for name, value in values.items():
            levels = value.split("/") if name == self._rest else [value]
            if not all(levels) or any(_BAD_LEVEL_CHARS.search(v) or v == ".." for v in levels):
                raise BadTopic(f"{name}={value!r} is not a topic level")
        name = self.template.replace("*}", "}").format(**values)
        if len(name) > MAX_TOPIC_CHARS:
            raise BadTopic(f"topic of {len(name)} characters (at most {MAX_TOPIC_CHARS})")
        return Address(name, self)

    def at(self, name: str) -> Address[M]:
        """A concrete topic name checked against this template."""
        values = self.match(name)
        if values is None:
            raise BadTopic(f"{name!r} is not a topic of {self.template!r}")
        return self.format(**values)

    def filter(self, **fixed: str) -> str:
        """A subscription filter: given params fixed, the others `+` (the `*` one: `#`)."""
        wild = {name: "#" if name == self._rest else "+" for name in self.params}
        return self.template.replace("*}", "}").format(**{**wild, **fixed})

    def match(self, topic: str) -> dict[str, str] | None:
        """The params of a concrete topic, or None when it is not an instance of this one."""
        levels, parts = self.template.split("/"), topic.split("/")
        if self._rest is not None and len(parts) > len(levels):
            parts = [*parts[: len(levels) - 1], "/".join(parts[len(levels) - 1 :])]
        if len(levels) != len(parts):
            return None
        values = {}
        for level, part in zip(levels, parts, strict=True):
            placeholder = _PLACEHOLDER.match(level)
            if placeholder:
                if not part:
                    return None
                values[placeholder.group(1)] = part
            elif level != part:
                return None
        return values


CMS_ROOT = "cms"
CMS_ALL = "cms/#"

# Any CMS key (the CLI, operators); the families below are its typed instances.
CMS_KEY = Topic("cms/{key*}", CmsEntry, retained=True)

# Capability Metadata Store: every retained value is a CmsEntry.
AGENT_CARD = Topic("cms/agents/{agent}", CmsEntry, retained=True)
AGENT_STATUS = Topic("cms/agents/{agent}/status", CmsEntry, retained=True)
MODEL_DETAIL = Topic("cms/slm/{model}/{field}", CmsEntry, retained=True)
PARAMETER = Topic("cms/parameters/{model}/{name}", CmsEntry, retained=True)
# Deployment configuration (services/core/configs.py lists the keys): the site's, and a model's.
SITE_CONFIG = Topic("cms/configs/{name}", CmsEntry, retained=True)
MODEL_CONFIG = Topic("cms/configs/{model}/{name}", CmsEntry, retained=True)
# Scale events: an operator's desired instances of a model, `edgecollab up`'s current ones.
SCALING = Topic("cms/scaling/{model}/{name}", CmsEntry, retained=True)
# Results of the paper's experiments (`edgecollab simulate --publish`), for the dashboard.
EXPERIMENT = Topic("cms/experiments/{name}", CmsEntry, retained=True)
METRIC = Topic("cms/metrics/{scope}/{name}", CmsEntry, retained=True)
INFERENCE_STATE = Topic("cms/inference/{task}/{field}", CmsEntry, retained=True)
CACHE = Topic("cms/cache/{key}", CmsEntry, retained=True)
# Fine-tuning / RAG state: a knowledge base's indexing job (status, progress, model,
# documents, error, domain), written by the knowledge base that runs it.
FINETUNE = Topic("cms/finetune/{job}/{field}", CmsEntry, retained=True)
# A knowledge base's catalogue: the documents it holds (its own entry, beside its card).
KB_CATALOG = Topic("cms/agents/{agent}/documents", CmsEntry, retained=True)
# Tenants (API keys of the gateway): config/model, usage_limit, tokens_used.
TENANT = Topic("cms/tenants/{tenant}/{name*}", CmsEntry, retained=True)

# Other sites' entries, as the replicator mirrors them here (only it writes under cms/sites/):
# site b's `cms/agents/w1` is `cms/sites/b/agents/w1` at every other site.
SITE_KEY = Topic("cms/sites/{site}/{key*}", CmsEntry, retained=True)
REMOTE_AGENT_CARD = Topic("cms/sites/{site}/agents/{agent}", CmsEntry, retained=True)
REMOTE_AGENT_STATUS = Topic("cms/sites/{site}/agents/{agent}/status", CmsEntry, retained=True)
# This site's replicator's link to each peer site (local, not replicated): connected, rtt_ms (the
# round trip to the peer's broker, what a task sent there pays on top), counters.
REPLICATION_PEER = Topic("cms/replication/peers/{site}", CmsEntry, retained=True)

# Data cooperation.
# A reading is retained as its stream's last value, so a new consumer starts with one.
READING = Topic("data/{domain}/{stream}/{agent}", Reading, retained=True, qos=0)
EMBEDDING = Topic("data/{domain}/{stream}/embeddings/{agent}", EmbeddingRecord, qos=0)

# Computation cooperation.
# An orchestrator first says it took the query (Accepted), then answers.
QUERIES = Topic("computation/queries", Query, replies=(Accepted, Answer))
CLASSIFY = Topic("computation/classify", ClassifyRequest, replies=(Classification,))
EMBED = Topic("computation/embed", Embed, replies=(Embeddings,))
TASKS = Topic("computation/tasks/{agent}", Task, replies=(TaskResult, Rejected))
# A request's tokens, under its requester's name: only the requester may read them.
STREAM = Topic("computation/stream/{client}/{request}", TokenChunk, qos=0)
# A task for an agent of a neighbour site: this site's replicator takes it and sends it on as
# computation/tasks/<agent> to that site's broker over its link, and brings the reply back.
REMOTE_TASKS = Topic("computation/sites/{site}/tasks/{agent}", Task, replies=(TaskResult, Rejected))

# Knowledge cooperation: a domain's experts (one of them answers), or one sensor about its data.
KNOWLEDGE = Topic("knowledge/{domain}/ask", KnowledgeQuery, replies=(KnowledgeAnswer,))
SENSOR_ASK = Topic("knowledge/{domain}/sensors/{agent}", KnowledgeQuery, replies=(KnowledgeAnswer,))
# The paper's knowledge.gpt/arithmetic: a sandboxed calculator peer runs a program, says what it
# printed (sandboxes share it: one of them answers).
ARITHMETIC = Topic("knowledge/arithmetic/run", ProgramRun, replies=(ProgramResult,))

# A domain's knowledge base (the paper's "knowledge base"): the passages nearest a text, each
# with its source; and documents added to it (answered with the job that indexes them).
KB_RETRIEVE = Topic("knowledge/{domain}/retrieve", Retrieve, replies=(Passages,))
KB_DOCUMENTS = Topic("knowledge/{domain}/documents", KbDocument, replies=(KbJob,))
# A lexicon (the knowledge base's WordNet): which of several answers its entries support.
KB_CHECK = Topic("knowledge/{domain}/check", Check, replies=(Checked,))

# Across sites: what a peer site's replicator publishes on this site's broker, `site` being the
# sender: its own changes, and anti-entropy (digest → versions, want → changes).
REPLICA_CHANGES = Topic("replication/from/{site}/changes", ReplicaChanges)
REPLICA_DIGEST = Topic("replication/from/{site}/digest", ReplicaDigest, replies=(ReplicaVersions,))
REPLICA_WANT = Topic("replication/from/{site}/want", ReplicaWant, replies=(ReplicaChanges,))
# This site's replicator remembers deleted keys here, each with an MQTT message expiry.
TOMBSTONE = Topic("replication/tombstones/{key*}", Tombstone, retained=True)

# Errors about input a service dropped with no response topic to answer on.
ERRORS = Topic("errors/{service}", Error)

# Each client's response topic (MQTT 5 Response Topic); Correlation Data tells requests apart.
REPLIES: Topic[Any] = Topic("replies/{client}", Message)
