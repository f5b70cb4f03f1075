"""The scheduling experiment's inputs: fleet, workload, cloud model; the node and trace files.

Shared by `edgecollab simulate` and the live `edgecollab bench fig6`, so both replay the same
requests on the same fleet.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.ids import AgentIdField, Domain
from services.classifier.complexity import BASE_BIN, TOKEN_BINS
from services.core.errors import ConfigError
from services.scheduling.outcomes import Prices

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "data" / "fig6.json"
DEFAULT_MAX_TOKENS = 512  # a request's cap when its trace line gives none
MAX_TOKENS_LIMIT = 4096  # the largest max_tokens a Query or Task may carry
MAX_PROMPT_TOKENS = 131_072  # a 128k-token context
MAX_TRACE_S = 1e8  # about three years of arrivals
Difficulty = Literal["easy", "medium", "hard"]
DIFFICULTIES: tuple[Difficulty, ...] = ("easy", "medium", "hard")


class InputFileError(ConfigError):
    """A node or trace file we refuse; the message names the file, line and field."""


class NodeSpec(BaseModel):
    """One line of a node file: a device's batch-1 decode rate and concurrency limit."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: AgentIdField
    tokens_per_s: float = Field(gt=0)
    concurrency: int = Field(ge=1)
    batching_beta: float = Field(0.5, ge=0, le=1)


class TraceLine(BaseModel):
    """One line of a trace file (JSON Lines): the request as it arrives (time, prompt tokens,
    max_tokens, the classifier's domain and difficulty) and its true output length."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    t: float = Field(ge=0, le=MAX_TRACE_S)
    prompt_tokens: int = Field(ge=0, le=MAX_PROMPT_TOKENS)
    output_tokens: int = Field(ge=1, le=MAX_TOKENS_LIMIT)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT)
    domain: Domain = "general"
    difficulty: Difficulty | None = None


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a workload: arrival time (s), prompt tokens and its true output tokens,
    with what is known of it at arrival (max_tokens, domain, difficulty)."""

    t: float
    prompt_tokens: int
    output_tokens: int  # the truth: known to the simulator, never to a policy
    max_tokens: int = DEFAULT_MAX_TOKENS
    domain: str = "general"
    difficulty: str | None = None
    site: int = 0  # the site it arrives at (`edgecollab simulate --sites`)


class PromptSpec(BaseModel):
    """Log-normal prompt lengths, clipped."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    median: float = Field(gt=0)
    sigma: float = Field(ge=0)
    min: int = Field(ge=0)
    max: int = Field(ge=1)


class LabelSpec(BaseModel):
    """How the generated requests get a domain and a difficulty (the Classifier Engine's labels).

    With probability `fidelity` a request's (domain, difficulty) is one of the pairs whose
    expected tokens in the classifier's table (services/classifier/complexity.py) is the
    request's output size (the nearest table value); otherwise it is any of the 15 pairs,
    uniformly. So `fidelity` sets how much a length predictor can learn from the labels.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    fidelity: float = Field(ge=0, le=1)


def label_pairs() -> list[tuple[str, str]]:
    """Every (domain, difficulty) the classifier's table knows."""
    return [(d, f) for d in BASE_BIN for f in DIFFICULTIES]


def consistent_pairs(output_tokens: int) -> list[tuple[str, str]]:
    """The pairs whose table value is the bin nearest `output_tokens` (maybe none)."""
    nearest = min(range(len(TOKEN_BINS)), key=lambda i: abs(TOKEN_BINS[i] - output_tokens))
    return [(d, f) for d, f in label_pairs() if BASE_BIN[d][f] == nearest]


class WorkloadSpec(BaseModel):
    """Poisson arrivals at a base rate, times `surge_multiplier` during periodic surges."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    base_rate_rps: float = Field(gt=0)
    surge_multiplier: float = Field(ge=0)
    surge_period_s: float = Field(gt=0)
    surge_duration_s: float = Field(ge=0)
    surge_offset_s: float = Field(ge=0)
    output_tokens: list[int]
    output_weights: list[float]
    prompt_tokens: PromptSpec
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT)
    labels: LabelSpec | None = None
    length_sigma: float = Field(0.0, ge=0, le=3)  # log-normal jitter of each output size

    def rate_pieces(self, horizon_s: float) -> list[tuple[float, float, float]]:
        """(start, end, rate) pieces covering [0, horizon_s)."""
        cuts = {0.0, horizon_s}
        start = self.surge_offset_s
        while start < horizon_s:
            cuts |= {start, min(start + self.surge_duration_s, horizon_s)}
            start += self.surge_period_s
        edges = sorted(c for c in cuts if c <= horizon_s)
        return [(a, b, self.rate_at(a)) for a, b in itertools.pairwise(edges)]

    def rate_at(self, t: float) -> float:
        """Arrival rate at time t."""
        phase = (t - self.surge_offset_s) % self.surge_period_s
        surging = t >= self.surge_offset_s and phase < self.surge_duration_s
        return self.base_rate_rps * (self.surge_multiplier if surging else 1.0)


class CloudModel(BaseModel):
    """Simulated cloud latency: time to first token, then output at a fixed rate; no limit."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    ttft_s: float = Field(1.0, ge=0)
    decode_tok_s: float = Field(30.0, gt=0)
    usd_per_1m_input: float = Field(30.0, ge=0)
    usd_per_1m_output: float = Field(60.0, ge=0)

    def latency_s(self, output_tokens: int) -> float:
        return self.ttft_s + output_tokens / self.decode_tok_s

    @property
    def prices(self) -> Prices:
        return Prices(
            usd_per_1m_input=self.usd_per_1m_input, usd_per_1m_output=self.usd_per_1m_output
        )


class NodeType(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    decode_tok_s: float = Field(gt=0)
    max_concurrency: int = Field(ge=1)


class FleetEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    type: str
    count: int = Field(ge=0)


class Scenario(BaseModel):
    """The experiment file (tools/sim/data/fig6.json): node types, fleet, workload, cloud."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    horizon_s: float = Field(gt=0)
    batching_beta: float = Field(ge=0, le=1)
    node_types: dict[str, NodeType]
    fleet: list[FleetEntry]
    workload: WorkloadSpec
    cloud: CloudModel

    def nodes(self, mix: dict[str, int] | None = None) -> list[NodeSpec]:
        """The fleet as node specs; `mix` (type -> count) replaces the file's proportions."""
        counts = mix if mix is not None else {e.type: e.count for e in self.fleet}
        unknown = set(counts) - set(self.node_types)
        if unknown:
            known = ", ".join(self.node_types)
            raise InputFileError(f"unknown node type(s) {sorted(unknown)}; known: {known}")
        return [
            NodeSpec(
                id=f"{kind.replace('_', '-')}-{n + 1}",
                tokens_per_s=self.node_types[kind].decode_tok_s,
                concurrency=self.node_types[kind].max_concurrency,
                batching_beta=self.batching_beta,
                type=kind,
            )
            for kind, count in counts.items()
            for n in range(count)
        ]


def load_scenario(path: Path = DEFAULT_SCENARIO) -> Scenario:
    """Read an experiment file; InputFileError names the field that is wrong."""
    try:
        return Scenario.model_validate_json(Path(path).read_bytes())
    except ValidationError as e:
        raise InputFileError(f"{path}: {_describe(e)}") from None
    except OSError as e:
        raise InputFileError(f"{path}: {e.strerror}") from None


def generate_workload(
    spec: WorkloadSpec, *, horizon_s: float, seed: int, load_scale: float = 1.0
) -> list[Arrival]:
    """The bursty workload: requests sorted by arrival time, reproducible from `seed`.

    Times, prompts and output sizes come from one random stream, labels and the length jitter
    from others, so a seed's arrivals and sizes do not depend on the label settings.
    """
    rng = random.Random(seed)
    labels_rng, jitter_rng = random.Random(f"{seed}:labels"), random.Random(f"{seed}:jitter")
    p = spec.prompt_tokens
    mu = math.log(p.median)
    cum_weights = list(itertools.accumulate(spec.output_weights))
    pairs = label_pairs()
    consistent = {size: consistent_pairs(size) for size in spec.output_tokens}
    requests: list[Arrival] = []
    for start, end, rate in spec.rate_pieces(horizon_s):
        t, scaled = start, rate * load_scale
        while scaled > 0:
            t += rng.expovariate(scaled)
            if t >= end:
                break
            prompt = min(max(round(rng.lognormvariate(mu, p.sigma)), p.min), p.max)
            size = rng.choices(spec.output_tokens, cum_weights=cum_weights)[0]
            domain, difficulty = "general", None
            if spec.labels is not None:
                fits = consistent[size]
                use = fits if fits and labels_rng.random() < spec.labels.fidelity else pairs
                domain, difficulty = labels_rng.choice(use)
            output = size
            if spec.length_sigma > 0:
                output = round(size * jitter_rng.lognormvariate(0.0, spec.length_sigma))
            output = min(max(output, 1), spec.max_tokens)
            requests.append(Arrival(t, prompt, output, spec.max_tokens, domain, difficulty))
    return requests


def load_nodes(path: Path) -> list[NodeSpec]:
    """Read a node file (a JSON list of node objects); errors name the line and field."""
    text = _read(path)
    nodes: list[NodeSpec] = []
    seen: set[str] = set()
    for line, item in _array_items(path, text):
        try:
            node = NodeSpec.model_validate(item)
        except ValidationError as e:
            raise InputFileError(f"{path}: line {line}: {_describe(e)}") from None
        if node.id in seen:
            raise InputFileError(f"{path}: line {line}: field 'id': duplicate id {node.id!r}")
        seen.add(node.id)
        nodes.append(node)
    if not nodes:
        raise InputFileError(f"{path}: no nodes")
    return nodes


def load_trace(path: Path) -> list[Arrival]:
    """Read a trace (JSON Lines); errors name the line and field, including unsorted times."""
    requests: list[Arrival] = []
    for number, raw in enumerate(_read(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = TraceLine.model_validate_json(raw)
        except ValidationError as e:
            raise InputFileError(f"{path}: line {number}: {_describe(e)}") from None
        if line.output_tokens > line.max_tokens:
            default = "" if "max_tokens" in line.model_fields_set else ", the default"
            raise InputFileError(
                f"{path}: line {number}: field 'output_tokens': {line.output_tokens} is more "
                f"than max_tokens ({line.max_tokens}{default}); a generation stops at max_tokens"
            )
        if requests and line.t < requests[-1].t:
            raise InputFileError(
                f"{path}: line {number}: field 't': {line.t} is earlier than the line before "
                f"({requests[-1].t}); times must be sorted"
            )
        requests.append(
            Arrival(
                line.t,
                line.prompt_tokens,
                line.output_tokens,
                line.max_tokens,
                line.domain,
                line.difficulty,
            )
        )
    if not requests:
        raise InputFileError(f"{path}: no requests (an empty trace)")
    return requests


def write_nodes(path: Path, nodes: list[NodeSpec]) -> None:
    """Write a node file, one node per line."""
    lines = ",\n".join(" " + json.dumps(n.model_dump(), sort_keys=False) for n in nodes)
    Path(path).write_text("[\n" + lines + "\n]\n")


def write_trace(path: Path, requests: list[Arrival]) -> None:
    """Write a trace file (JSON Lines)."""
    with Path(path).open("wb") as f:
        for r in requests:
            line: dict[str, object] = {
                "t": round(r.t, 6),
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens,
                "max_tokens": r.max_tokens,
                "domain": r.domain,
            }
            if r.difficulty is not None:
                line["difficulty"] = r.difficulty
            f.write(orjson.dumps(line) + b"\n")


def _read(path: Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise InputFileError(f"{path}: {e.strerror}") from None


def _array_items(path: Path, text: str) -> list[tuple[int, Any]]:
    """The elements of a JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    try:
        if not isinstance(json.loads(text), list):
            raise InputFileError(f"{path}: line 1: a node file is a JSON list of node objects")
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    items: list[tuple[int, Any]] = []
    i = text.index("[") + 1
    while True:
        i = _skip(text, i, " \t\r\n,")
        if text[i] == "]":
            return items
        value, end = decoder.raw_decode(text, i)
        items.append((text.count("\n", 0, i) + 1, value))
        i = end


def _skip(text: str, i: int, chars: str) -> int:
    while text[i] in chars:
        i += 1
    return i


def _describe(error: ValidationError) -> str:
    """`field 'x': message` for each problem pydantic found."""
    parts = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(whole line)"
        parts.append(f"field {where!r}: {err['msg']}")
    return "; ".join(parts)
