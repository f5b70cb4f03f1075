"""Every topic of the bus, declared once and bound to its payload model.

Templates name whole levels in braces (`computation/tasks/{agent}`); they compile to `+`
filters and are checked when declared. No other module writes topic strings by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from schemas import (
    Answer,
    Classification,
    ClassifyRequest,
    CmsEntry,
    EmbeddingRecord,
    Error,
    KnowledgeAnswer,
    KnowledgeQuery,
    Message,
    Query,
    Reading,
    Rejected,
    Task,
    TaskResult,
    TokenChunk,
)

_PLACEHOLDER = re.compile(r"^\{([a-z_]+)\}$")
_BAD_LEVEL_CHARS = re.compile(r"[+#/\x00]")


@dataclass(frozen=True)
class Topic:
    """A topic template bound to the model published there (and the models of its replies)."""

    template: str
    payload: type[Message]
    replies: tuple[type[Message], ...] = ()
    retained: bool = False
    qos: int = 1
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = []
        for level in self.template.split("/"):
            match = _PLACEHOLDER.match(level)
            if match:
                names.append(match.group(1))
            elif not level or "{" in level or _BAD_LEVEL_CHARS.search(level):
                raise ValueError(f"bad topic template {self.template!r}: level {level!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"repeated placeholder in {self.template!r}")
        object.__setattr__(self, "params", tuple(names))

    def format(self, **values: str) -> str:
        """The concrete topic; each value must be one non-empty level."""
        if set(values) != set(self.params):
            raise ValueError(f"{self.template!r} needs {self.params}, got {sorted(values)}")
        for name, value in values.items():
            if not value or _BAD_LEVEL_CHARS.search(value):
                raise ValueError(f"{name}={value!r} is not a topic level")
        return self.template.format(**values)

    def filter(self, **fixed: str) -> str:
        """A subscription filter: given params fixed, the others `+`."""
        return self.template.format(**{name: fixed.get(name, "+") for name in self.params})

    def match(self, topic: str) -> dict[str, str] | None:
        """The params of a concrete topic, or None when it is not an instance of this one."""
        levels, parts = self.template.split("/"), topic.split("/")
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

# Capability Metadata Store: every retained value is a CmsEntry.
AGENT_CARD = Topic("cms/agents/{agent}", CmsEntry, retained=True)
AGENT_STATUS = Topic("cms/agents/{agent}/status", CmsEntry, retained=True)
MODEL_DETAIL = Topic("cms/slm/{model}/{field}", CmsEntry, retained=True)
PARAMETER = Topic("cms/parameters/{model}/{name}", CmsEntry, retained=True)
METRIC = Topic("cms/metrics/{scope}/{name}", CmsEntry, retained=True)
INFERENCE_STATE = Topic("cms/inference/{task}/{field}", CmsEntry, retained=True)
CACHE = Topic("cms/cache/{key}", CmsEntry, retained=True)

# Data cooperation.
READING = Topic("data/{domain}/{stream}/{agent}", Reading, qos=0)
EMBEDDING = Topic("data/{domain}/{stream}/embeddings/{agent}", EmbeddingRecord, qos=0)

# Computation cooperation.
QUERIES = Topic("computation/queries", Query, replies=(Answer,))
CLASSIFY = Topic("computation/classify", ClassifyRequest, replies=(Classification,))
TASKS = Topic("computation/tasks/{agent}", Task, replies=(TaskResult, Rejected))
STREAM = Topic("computation/stream/{request}", TokenChunk, qos=0)

# Knowledge cooperation: a domain's experts (one of them answers), or one sensor about its data.
KNOWLEDGE = Topic("knowledge/{domain}/ask", KnowledgeQuery, replies=(KnowledgeAnswer,))
SENSOR_ASK = Topic("knowledge/{domain}/sensors/{agent}", KnowledgeQuery, replies=(KnowledgeAnswer,))

# Errors about input a service dropped with no response topic to answer on.
ERRORS = Topic("errors/{service}", Error)

# Each client's response topic (MQTT 5 Response Topic); Correlation Data tells requests apart.
REPLIES = Topic("replies/{client}", Message)
