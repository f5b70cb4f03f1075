"""The wire contract: one frozen pydantic model per message kind.

Every payload is UTF-8 JSON carrying `"v": 1` (schema version) and a `type` tag, so one parse of
a union picks the right model. Fields are snake_case; unknown fields are refused.
"""

from __future__ import annotations

import math
import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.ids import (
    VERSION_PATTERN,
    AgentIdField,
    Domain,
    RequestIdField,
    SiteIdField,
    TaskIdField,
)

SCHEMA_VERSION: Literal[1] = 1

AgentKind = Literal[
    "worker",
    "sensor",
    "orchestrator",
    "classifier",
    "replicator",
    "gateway",
    "sandbox",
    "kb",
    "client",
]


class Outcome(StrEnum):
    """How one request ended; counted the same way by the live orchestrator and the simulator."""

    EDGE = "edge"  # processed at the edge
    CLOUD = "cloud"  # sent to the cloud directly (not a rejection)
    REJECTED_TO_CLOUD = "rejected_to_cloud"  # rejected at the edge, then served by the cloud
    REJECTED = "rejected"  # rejected at the edge and no cloud configured
    FAILED = "failed"  # error or deadline


# Why a generation ended: an end-of-sequence token or stop string, max_tokens, the deadline,
# or the requester went away.
FinishReason = Literal["stop", "length", "deadline", "cancelled"]
ErrorCode = Literal[
    "bad_json",
    "bad_schema",
    "bad_version",
    "too_large",
    "unknown_topic",
    "bad_request",
    "deadline",
    "unavailable",
    "cloud_error",
    "internal",
    "forbidden",
    "quota",
]


def now() -> float:
    """Wall-clock seconds since the epoch (all timestamps on the wire use it)."""
    return time.time()


def _version_required(schema: dict[str, Any]) -> None:
    """A sender must write `"v": 1` (the services refuse a message without it), so the JSON
    Schema says so, though the Python models fill it in themselves."""
    schema["required"] = ["v", *schema.get("required", [])]


class Message(BaseModel):
    """Base of every payload: versioned, immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_version_required)

    v: Literal[1] = SCHEMA_VERSION


class ModelInfo(BaseModel):
    """What a worker's language model is (from the exported model card)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    architecture: str | None = None
    parameters: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    version: str | None = Field(
        None,
        pattern=VERSION_PATTERN,
        description="the deployed version; cms/configs/<model>/version sends tasks only to it",
    )


class AgentCard(Message):
    """What an agent is and offers; retained under cms/agents/<agent>."""

    type: Literal["agent_card"] = "agent_card"
    agent: AgentIdField
    kind: AgentKind
    epoch: int = Field(ge=1, description="increases at every start of the agent")
    backend: str | None = Field(None, description="worker backend: onnx or emulated")
    model: ModelInfo | None = None
    domains: list[Domain] = []
    streams: list[str] = Field([], description="data topics this agent publishes")
    checks: list[Domain] = Field(
        [], description="domains whose answers it checks against a lexicon (knowledge/<d>/check)"
    )
    tokens_per_s: float | None = Field(None, ge=0, description="batch-1 decode rate")
    concurrency: int | None = Field(None, ge=1, description="requests served at once")
    batching_beta: float | None = Field(None, ge=0, le=1)
    started_at: float


class AgentStatus(Message):
    """Liveness and load of an agent; retained under cms/agents/<agent>/status."""

    type: Literal["agent_status"] = "agent_status"
    agent: AgentIdField
    epoch: int = Field(ge=0, description="0 when written by the Last Will")
    online: bool
    active: int = Field(0, ge=0)
    queued: int = Field(0, ge=0)
    tokens_per_s: float = Field(0.0, ge=0, description="recent decode rate, all requests")
    exceptions: int = Field(0, ge=0, description="exceptions caught and logged since start")
    updated_at: float


class CmsEntry(Message):
    """Every retained value under cms/: the value plus what a merge needs."""

    type: Literal["cms_entry"] = "cms_entry"
    value: Any
    version: int = Field(ge=1)
    updated_at: float
    origin: str = Field(min_length=1, description="agent or site that wrote it")


class CachedAnswer(BaseModel):
    """The value of cms/cache/<hash>: an expert's answer kept for the same question."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    answer: str
    agent: AgentIdField
    domain: Domain
    expires_at: float


class Reading(Message):
    """One sensor sample on data/<domain>/<stream>/<agent>."""

    type: Literal["reading"] = "reading"
    agent: AgentIdField
    domain: Domain
    stream: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    value: float | None = None
    text: str | None = Field(None, max_length=2000, description="e.g. a camera caption")
    unit: str = Field(max_length=16)
    ts: float

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("value must be a finite number")
        return value


class EmbeddingRecord(Message):
    """A vector for a window of readings, shared so peers need not recompute it."""

    type: Literal["embedding_record"] = "embedding_record"
    agent: AgentIdField
    domain: Domain
    stream: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    model: str
    dim: int = Field(ge=1, le=8192)
    vector: list[float]
    window_start: float
    window_end: float
    summary: str | None = None

    @field_validator("vector")
    @classmethod
    def _finite_vector(cls, vector: list[float]) -> list[float]:
        if not all(math.isfinite(x) for x in vector):
            raise ValueError("vector must hold finite numbers")
        return vector

    def model_post_init(self, __context: Any) -> None:
        if len(self.vector) != self.dim:
            raise ValueError(f"vector has {len(self.vector)} numbers, dim says {self.dim}")


class SamplingOptions(BaseModel):
    """Decoding knobs a request may set; unset ones come from cms/parameters/<model>/..."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float | None = Field(None, ge=0, le=5)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=5)
    seed: int | None = None
    stop: list[str] = Field([], max_length=8)


class Resume(BaseModel):
    """Where a streamed answer stopped when its worker failed: the next worker continues it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(max_length=200_000, description="what the requester has been sent")
    seq: int = Field(ge=0, description="the next chunk's sequence number")
    attempt: int = Field(1, ge=1, le=1000, description="the attempt that wrote the last chunk")


class Query(Message):
    """A user's request to the edge cluster, on computation/queries."""

    type: Literal["query"] = "query"
    request_id: RequestIdField
    text: str = Field(min_length=1, max_length=8000)
    max_tokens: int = Field(128, ge=1, le=4096)
    deadline: float = Field(description="absolute epoch seconds; past it the request fails")
    stream: bool = False
    tenant: str | None = None
    sampling: SamplingOptions = SamplingOptions()
    ack: bool = Field(
        False, description="send an `accepted` interim reply first (a client that retries)"
    )
    resume: Resume | None = Field(
        None, description="sent again: what its stream had shown, for the answer to go on from"
    )


class Step(BaseModel):
    """Provenance of one step of an answered query."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    topic: str
    agent: str | None
    site: str | None = Field(None, description="the neighbour site of `agent`; None: this one")
    where: Literal["edge", "cloud", "none"]
    outcome: Literal["ok", "rejected", "failed", "cached"]
    prompt_tokens: int = 0
    output_tokens: int = 0
    ms: float = 0.0
    cost_usd: float = 0.0
    detail: str | None = None
    program: str | None = Field(None, description="the program this step wrote or ran")
    confidence: float | None = Field(
        None, ge=0, le=1, description="a generation's knowledge-gap signal (its first tokens)"
    )
    output: str | None = Field(
        None, description="what this step answered, where answers were compared (a gap)"
    )


class Accepted(Message):
    """An interim reply: `agent` has taken the request and is working on it. The requester
    then knows whose death to watch for (its Last Will), and retries if it comes."""

    type: Literal["accepted"] = "accepted"
    request_id: RequestIdField
    agent: AgentIdField


class Fact(BaseModel):
    """A measured value an answer states: the window of one stream of one agent, from the
    readings (composed by code, never by a model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agent: str
    domain: Domain
    stream: str
    label: str = Field(description="the stream's name for people, e.g. 'heart rate'")
    value: float = Field(description="the newest reading")
    unit: str = Field(description="the stream's unit (a reading's accepted spelling normalised)")
    ts: float = Field(description="the newest reading's time (epoch seconds)")
    since: float = Field(description="the oldest reading's time in the window")
    n: int = Field(ge=1, description="readings in the window")
    mean: float
    low: float
    high: float
    trend: Literal["rising", "falling", "steady"]
    alert: str | None = Field(None, description="the alert the newest value is past, if any")
    threshold: float | None = Field(None, description="that alert's threshold")
    side: Literal["above", "below"] | None = None


class Passage(BaseModel):
    """A piece of a knowledge-base document, with its source; `stream`, `low`, `high`, `unit`
    and `label` when it states a reference range or guideline value for a data stream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="<domain>/<document>#<n>")
    domain: Domain
    document: str
    title: str = Field(description="the section it comes from")
    text: str
    source: str = Field(description="where its facts come from, in full")
    cite: str = Field(description="the short label an answer cites it by, e.g. 'WHO 2021'")
    score: float = Field(0.0, description="cosine similarity to the question")
    matched: Literal["text", "stream"] = Field(
        "text", description="text: among the nearest to the question; stream: a stream's reference"
    )
    stream: str | None = None
    low: float | None = None
    high: float | None = None
    unit: str | None = None
    label: str | None = Field(None, description="what the range is, e.g. 'normal at rest'")


class Answer(Message):
    """The orchestrator's reply to a Query."""

    type: Literal["answer"] = "answer"
    request_id: RequestIdField
    text: str
    outcome: Outcome
    partial: bool = False
    steps: list[Step] = []
    ms: float = 0.0
    cost_usd: float = 0.0
    facts: list[Fact] = Field([], description="the measured values the text states")
    verified: bool | None = Field(
        None,
        description="true: every number with a unit in the generated text matches a fact (or a "
        "retrieved passage); false: some did not and were removed (see unverified); null: no "
        "data step and no passage, not checked",
    )
    unverified: list[str] = Field(
        [], description="numbers with a unit the model wrote that match no reading or passage"
    )
    passages: list[Passage] = Field([], description="the knowledge-base passages the text cites")


class ClassifyRequest(Message):
    """Ask the Classifier Engine about a text, on computation/classify."""

    type: Literal["classify_request"] = "classify_request"
    request_id: RequestIdField
    text: str = Field(min_length=1, max_length=8000)


EMBED_BATCH = 32  # texts per embed request: 32 x 384 floats at 7 decimals fit max_payload


class Embed(Message):
    """Texts to embed, on computation/embed: the Classifier Engine's MiniLM serves the site."""

    type: Literal["embed"] = "embed"
    request_id: RequestIdField
    texts: list[Annotated[str, Field(max_length=8000)]] = Field(
        min_length=1, max_length=EMBED_BATCH
    )


class Embeddings(Message):
    """One unit vector per text, in order (7 decimals: what float32 holds)."""

    type: Literal["embeddings"] = "embeddings"
    request_id: RequestIdField
    agent: AgentIdField
    model: str
    dims: int = Field(ge=1, le=8192)
    tokens: int = Field(ge=0, description="what the texts cost the embedder's tokenizer")
    vectors: list[list[float]]


Difficulty = Literal["easy", "medium", "hard"]


class Complexity(BaseModel):
    """Expected output tokens and a difficulty level, with the classifier's confidence in it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    expected_tokens: int = Field(ge=1)
    difficulty: Difficulty
    confidence: float = Field(1.0, ge=0, le=1)


class AgentMatch(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    agent: str
    score: float


class Classification(Message):
    """Domain, complexity, knowledge gap and matching agents of a text."""

    type: Literal["classification"] = "classification"
    request_id: RequestIdField
    agent: AgentIdField | None = Field(None, description="the classifier that answered")
    domain: str
    sub_labels: list[str] = []
    confidence: float = Field(ge=0, le=1)
    complexity: Complexity
    gap: bool
    matches: list[AgentMatch] = []


class Task(Message):
    """One generation step for one worker, on computation/tasks/<agent>."""

    type: Literal["task"] = "task"
    task_id: TaskIdField
    request_id: RequestIdField
    prompt: str = Field(min_length=1, max_length=32000)
    system: str | None = Field(None, max_length=8000)
    max_tokens: int = Field(ge=1, le=4096)
    deadline: float
    stream: bool = False
    sampling: SamplingOptions = SamplingOptions()
    client: AgentIdField | None = Field(
        None, description="the requester: tokens stream to computation/stream/<client>/<request>"
    )
    attempt: int = Field(1, ge=1, le=1000, description="1 + the workers tried before this one")
    resume: Resume | None = Field(None, description="a streamed answer to continue, not restart")


class GenerationStats(BaseModel):
    """What one generation cost, and why it ended."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    prefill_ms: float = Field(ge=0)
    ttft_ms: float = Field(0.0, ge=0, description="time to the first token")
    decode_tok_s: float = Field(ge=0)
    finish_reason: FinishReason
    confidence: float | None = Field(
        None, ge=0, le=1,
        description="mean probability the model gave its first 32 tokens (a knowledge-gap signal)",
    )  # fmt: skip
    entropy: float | None = Field(
        None, ge=0, description="mean entropy (nats) of its distribution over those tokens"
    )


class TaskResult(GenerationStats, Message):
    """A worker's finished generation: its text, its stats, and the worker's time on it."""

    type: Literal["task_result"] = "task_result"
    task_id: TaskIdField
    agent: AgentIdField
    text: str
    ms: float = Field(ge=0)


class Rejected(Message):
    """A worker at its concurrency limit refusing a task at once."""

    type: Literal["rejected"] = "rejected"
    task_id: TaskIdField
    agent: AgentIdField
    reason: str
    active: int = Field(ge=0)
    limit: int = Field(ge=0)
    queued: int = Field(0, ge=0)


class TokenChunk(Message):
    """A piece of streamed output on computation/stream/<client>/<request>."""

    type: Literal["token_chunk"] = "token_chunk"
    request_id: RequestIdField
    agent: AgentIdField
    seq: int = Field(ge=0)
    text: str
    done: bool = False
    attempt: int = Field(1, ge=1, description="a later attempt's chunks supersede an earlier's")


class KnowledgeQuery(Message):
    """A question to the experts of a domain, on knowledge/<domain>/ask."""

    type: Literal["knowledge_query"] = "knowledge_query"
    request_id: RequestIdField
    domain: Domain
    question: str = Field(min_length=1, max_length=8000)
    asker: AgentIdField
    max_tokens: int = Field(128, ge=1, le=4096)
    deadline: float
    sampling: SamplingOptions = SamplingOptions()


class KnowledgeAnswer(Message):
    """An expert's reply to a KnowledgeQuery."""

    type: Literal["knowledge_answer"] = "knowledge_answer"
    request_id: RequestIdField
    agent: AgentIdField
    domain: Domain
    answer: str
    output_tokens: int = Field(0, ge=0)
    ms: float = Field(0.0, ge=0)
    confidence: float | None = Field(None, ge=0, le=1, description="as GenerationStats'")


MAX_DOCUMENT_CHARS = 131072  # a document for the knowledge base, at most (split a longer one)


class Retrieve(Message):
    """Ask a domain's knowledge base for passages, on knowledge/<domain>/retrieve."""

    type: Literal["retrieve"] = "retrieve"
    request_id: RequestIdField
    domain: Domain
    text: str = Field(min_length=1, max_length=2000)
    k: int = Field(3, ge=1, le=20, description="passages nearest to the text")
    min_score: float = Field(0.0, ge=-1, le=1, description="nearer ones only")
    streams: list[str] = Field(
        [], max_length=32, description="also each of these streams' best reference passage"
    )
    deadline: float


class Passages(Message):
    """A knowledge base's answer to a Retrieve: the nearest passages first, then references."""

    type: Literal["passages"] = "passages"
    request_id: RequestIdField
    agent: AgentIdField
    domain: Domain
    model: str = Field(description="the embedder that ranked them")
    passages: list[Passage]
    ms: float = Field(0.0, ge=0)


MAX_CHECKED_ANSWERS = 8


class Check(Message):
    """Ask a lexicon which of several answers to a question its entries support, on
    knowledge/<domain>/check."""

    type: Literal["check"] = "check"
    request_id: RequestIdField
    domain: Domain
    question: str = Field(min_length=1, max_length=2000)
    answers: list[Annotated[str, Field(max_length=8000)]] = Field(
        min_length=1, max_length=MAX_CHECKED_ANSWERS
    )
    deadline: float


class Evidence(BaseModel):
    """A term of an answer and the lexicon entry of it nearest the question."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    answer: int = Field(ge=0, description="the answer's position in the Check")
    term: str
    entry: str = Field(description="the entry's words and gloss")
    source: str = Field(description="the lexicon and the entry's id, e.g. 'WordNet 3.0 moon.n.01'")
    score: float = Field(description="cosine similarity of the entry to the question")


class Checked(Message):
    """A lexicon's verdict on a Check: the answer its entries support best, or none (`reason`)."""

    type: Literal["checked"] = "checked"
    request_id: RequestIdField
    agent: AgentIdField
    domain: Domain
    model: str = Field(description="the embedder that compared them")
    best: int | None = Field(None, ge=0, description="the supported answer; None: cannot tell")
    reason: str
    evidence: list[Evidence] = Field([], description="each answer's best term, best first")
    ms: float = Field(0.0, ge=0)


JobStatus = Literal["queued", "running", "done", "failed"]


class KbDocument(Message):
    """A text or markdown document for a domain's knowledge base, on knowledge/<domain>/documents;
    answered with the job that indexes it (its progress: cms/finetune/<job>/...)."""

    type: Literal["kb_document"] = "kb_document"
    request_id: RequestIdField
    domain: Domain
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^/\x00]+$")
    text: str = Field(min_length=1, max_length=MAX_DOCUMENT_CHARS)
    source: str | None = Field(None, max_length=500, description="default: the document's own")
    deadline: float


class KbJob(Message):
    """An indexing job a knowledge base took (its state: cms/finetune/<job>/...)."""

    type: Literal["kb_job"] = "kb_job"
    request_id: RequestIdField
    agent: AgentIdField
    job: TaskIdField
    domain: Domain
    status: JobStatus = "queued"


class ProgramRun(Message):
    """A program for the sandboxed calculator peer, on knowledge/arithmetic/run: run it and
    say what it printed."""

    type: Literal["program_run"] = "program_run"
    request_id: RequestIdField
    language: Literal["python"] = "python"
    program: str = Field(min_length=1, max_length=65536)
    timeout_s: float = Field(5.0, gt=0, le=60, description="wall clock; the peer may cap it")
    deadline: float


class ProgramResult(Message):
    """What a program printed, and how its run ended (ok: exit 0, in time, output complete)."""

    type: Literal["program_result"] = "program_result"
    request_id: RequestIdField
    agent: AgentIdField
    stdout: str
    stderr: str = Field("", description="its last few KiB")
    exit_code: int | None = Field(description="None when the sandbox killed it")
    timed_out: bool = False
    truncated: bool = Field(False, description="stdout over the peer's cap: killed there")
    error: str | None = Field(None, description="one line on why it did not succeed")
    ms: float = Field(ge=0)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.truncated


class Error(Message):
    """What a service says about input it dropped, or a request it could not serve."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    service: str
    topic: str | None = None
    request_id: str | None = None


# -- across sites: the CMS replicator -------------------------------------------------------

ReplicaKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1000,
        pattern=r"^[^+#/\x00]+(/[^+#/\x00]+)*$",
        description="a key as all sites name it: `parameters/...` (shared by every site) or "
        "`sites/<site>/...` (one site's own entries, e.g. its agents)",
    ),
]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{1,16}$")]


class ReplicaRecord(BaseModel):
    """One key's state as sites exchange it: a CMS entry, or a tombstone (`deleted`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: ReplicaKey
    version: int = Field(ge=1)
    origin: str = Field(min_length=1, max_length=200)
    updated_at: float
    deleted: bool = False
    value: Any = None


class ReplicaChanges(Message):
    """Records one site sends another: its own changes as they happen, or the ones asked for
    with a `replica_want` (then `repair`, with `missing` naming asked-for keys it lacks)."""

    type: Literal["replica_changes"] = "replica_changes"
    site: SiteIdField = Field(description="the sending site")
    repair: bool = False
    records: list[ReplicaRecord] = Field([], max_length=5000)
    missing: list[ReplicaKey] = Field([], max_length=5000)


class GroupDigest(BaseModel):
    """One group of keys (`parameters`, `sites/<site>/agents`) summarised: key count, the sum of
    its records' hashes, and that sum per bucket (omitted for a small group)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: int = Field(ge=0)
    total: Hex64
    buckets: list[Hex64] | None = None


class ReplicaDigest(Message):
    """A site's digest of its CMS, sent to a peer that answers with the versions of the keys
    in the buckets where the two differ (anti-entropy)."""

    type: Literal["replica_digest"] = "replica_digest"
    site: SiteIdField = Field(description="the asking site")
    session: str = Field(
        pattern=r"^[A-Za-z0-9._:-]{1,64}$",
        description="changes when the asker restarts or reconnects: the peer then asks back",
    )
    buckets: int = Field(ge=1, le=4096, description="buckets per group")
    groups: dict[str, GroupDigest] = Field(max_length=10000)
    after: tuple[str, int] | None = Field(None, description="continue after this group, bucket")


class ReplicaVersions(Message):
    """The answer to a `replica_digest`: where the digests differ, and the answering site's
    `[key, version, origin, deleted, content hash]` in those buckets."""

    type: Literal["replica_versions"] = "replica_versions"
    site: SiteIdField = Field(description="the answering site")
    differ: dict[str, list[int]] = {}
    versions: list[tuple[ReplicaKey, int, str, bool, Hex64]] = Field([], max_length=20000)
    next: tuple[str, int] | None = Field(None, description="more differ after this bucket")


class ReplicaWant(Message):
    """Keys a site asks a peer for (after comparing versions); answered by `replica_changes`."""

    type: Literal["replica_want"] = "replica_want"
    site: SiteIdField = Field(description="the asking site")
    keys: list[ReplicaKey] = Field(min_length=1, max_length=5000)


class Tombstone(Message):
    """A deleted CMS key remembered by its site's replicator until it expires (retained under
    replication/tombstones/<key> with an MQTT message expiry), so a stale peer cannot bring the
    key back."""

    type: Literal["tombstone"] = "tombstone"
    key: ReplicaKey
    version: int = Field(ge=1)
    origin: str = Field(min_length=1, max_length=200)
    deleted_at: float


ALL_MESSAGES: tuple[type[Message], ...] = (
    AgentCard,
    AgentStatus,
    CmsEntry,
    Reading,
    EmbeddingRecord,
    Query,
    Accepted,
    Answer,
    ClassifyRequest,
    Classification,
    Embed,
    Embeddings,
    Task,
    TaskResult,
    Rejected,
    TokenChunk,
    KnowledgeQuery,
    KnowledgeAnswer,
    ProgramRun,
    ProgramResult,
    Retrieve,
    Passages,
    KbDocument,
    KbJob,
    Check,
    Checked,
    Error,
    ReplicaChanges,
    ReplicaDigest,
    ReplicaVersions,
    ReplicaWant,
    Tombstone,
)

AnyMessage = Annotated[
    AgentCard
    | AgentStatus
    | CmsEntry
    | Reading
    | EmbeddingRecord
    | Query
    | Accepted
    | Answer
    | ClassifyRequest
    | Classification
    | Embed
    | Embeddings
    | Task
    | TaskResult
    | Rejected
    | TokenChunk
    | KnowledgeQuery
    | KnowledgeAnswer
    | ProgramRun
    | ProgramResult
    | Retrieve
    | Passages
    | KbDocument
    | KbJob
    | Check
    | Checked
    | Error
    | ReplicaChanges
    | ReplicaDigest
    | ReplicaVersions
    | ReplicaWant
    | Tombstone,
    Field(discriminator="type"),
]
