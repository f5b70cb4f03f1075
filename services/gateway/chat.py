"""OpenAI's chat and embeddings requests in, edgecollab's messages out (and back).

Fields OpenAI defines that change nothing here (`user`, `logprobs: false`, ...) are accepted
and ignored; fields whose meaning the edge cannot honour (`n` > 1, `tools`) are refused with
400 rather than silently dropped.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas import Answer, Query, SamplingOptions, Step
from services.gateway.errors import ApiError

AUTO_MODEL = "edgecollab"  # any edge agent the orchestrator picks (the only routing today)
MAX_TEXT: int = Query.model_json_schema()["properties"]["text"]["maxLength"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[Any] | None = Field(None, max_length=0, description="not supported")
    # edgecollab's extension: seconds until the request's deadline
    timeout_s: float | None = Field(None, gt=0, le=600)

    def sampling(self) -> SamplingOptions:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 8:
            raise ApiError(400, "at most 8 stop sequences", param="stop")
        return SamplingOptions(
            temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop
        )

    def prompt(self) -> str:
        """The query text: the one user message as it is, else a transcript of the turns."""
        turns = [(m.role, m.text()) for m in self.messages]
        if len(turns) == 1 and turns[0][0] == "user":
            text = turns[0][1]
        else:
            text = "\n\n".join(f"{role.capitalize()}: {content}" for role, content in turns)
        if not text.strip():
            raise ApiError(400, "the messages hold no text", param="messages")
        if len(text) > MAX_TEXT:
            raise ApiError(
                400,
                f"the messages hold {len(text)} characters; at most {MAX_TEXT}",
                code="context_length_exceeded",
                param="messages",
            )
        return text

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def texts(self, *, max_inputs: int = 256) -> list[str]:
        given = [self.input] if isinstance(self.input, str) else self.input
        texts = [t for t in given if isinstance(t, str)]
        if not texts or len(texts) != len(given):
            raise ApiError(400, "input must be a string or a list of strings", param="input")
        if len(texts) > max_inputs:
            raise ApiError(400, f"at most {max_inputs} inputs per request", param="input")
        for i, text in enumerate(texts):
            if not text.strip() or len(text) > MAX_TEXT:
                raise ApiError(400, f"input[{i}] must hold 1-{MAX_TEXT} characters", param="input")
        return texts


def parse(model: type[BaseModel], body: Any) -> Any:
    """A request body as `model`, or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from None


# -- answers as OpenAI responses ------------------------------------------------------------


def model_name(card: Any) -> str:
    """The model a worker card serves (an emulated worker: its backend's name)."""
    return card.model.name if card.model else (card.backend or "unknown")


def final_step(answer: Answer) -> Step | None:
    """The generation that produced the text: the last step that ran and succeeded."""
    return next(
        (s for s in reversed(answer.steps) if s.outcome in ("ok", "cached") and s.where != "none"),
        None,
    )


def finish_reason(answer: Answer, query: Query) -> str:
    step = final_step(answer)
    return "length" if step and step.output_tokens >= query.max_tokens else "stop"


def usage(answer: Answer) -> dict[str, int]:
    prompt = sum(s.prompt_tokens for s in answer.steps)
    completion = sum(s.output_tokens for s in answer.steps)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def extension(answer: Answer) -> dict[str, Any]:
    """edgecollab's provenance, in the `edgecollab` field of a response."""
    return {
        "request_id": answer.request_id,
        "outcome": answer.outcome.value,
        "partial": answer.partial,
        "ms": answer.ms,
        "cost_usd": answer.cost_usd,
        "steps": [s.model_dump(mode="json") for s in answer.steps],
    }


def provenance_headers(answer: Answer) -> dict[str, str]:
    """The same in headers: outcome, cost, and `step=agent(where,outcome)` per step."""
    steps = ";".join(f"{s.name}={s.agent or s.topic}({s.where},{s.outcome})" for s in answer.steps)
    return {
        "x-edgecollab-request-id": answer.request_id,
        "x-edgecollab-outcome": answer.outcome.value,
        "x-edgecollab-cost-usd": f"{answer.cost_usd:.8f}",
        "x-edgecollab-provenance": steps.encode("ascii", "replace").decode()[:4000],
    }


def completion(answer: Answer, query: Query, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{query.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "logprobs": None,
                "finish_reason": finish_reason(answer, query),
            }
        ],
        "usage": usage(answer),
        "edgecollab": extension(answer),
    }


def chunk(query: Query, model: str, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One `chat.completion.chunk` of a stream."""
    return {
        "id": f"chatcmpl-{query.request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": extra.pop("finish_reason", None),
            }
        ],
        **extra,
    }
