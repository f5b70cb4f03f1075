"""A2A (the Agent2Agent protocol, 1.0, JSON-RPC binding): the edge cluster as one A2A agent.

`GET /.well-known/agent-card.json` is its agent card: a skill per domain that online agents
serve (the agents named in it), streaming, and the gateway's API keys as bearer tokens.
`POST /a2a` takes JSON-RPC 2.0 `SendMessage` (answered with a `Message`) and
`SendStreamingMessage` (server-sent events: a working `Task`, an artifact update per piece of
text as the worker's tokens arrive, then a completed, rejected or failed status); each is one
`Query`, with the answer's provenance in `metadata.edgecollab`. Tasks are not kept, so
`GetTask`, `CancelTask` and `SubscribeToTask` answer TaskNotFound.
"""

from __future__ import annotations

import contextlib
import datetime
import uuid
from collections.abc import AsyncIterator
from importlib import metadata
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from schemas import Answer, Query, SamplingOptions
from services.gateway.chat import MAX_TEXT, extension
from services.gateway.errors import ApiError
from services.gateway.http import JSON, EventStream, next_piece
from services.gateway.service import new_query

if TYPE_CHECKING:
    from services.gateway.app import Api

PROTOCOL_VERSION = "1.0"
CARD_PATH = "/.well-known/agent-card.json"
# JSON-RPC 2.0 and A2A error codes
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602
TASK_NOT_FOUND = -32001
EXAMPLES = {
    "health": "I have felt hot and dizzy since this morning. What should I do?",
    "environment": "Evaluate environmental risks for setting up an outdoor event",
    "math": "What is 17% of 2,340?",
    "code": "Write a Python function that reverses a string",
    "general": "What is the capital of France?",
}


class _RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class A2A:
    """The agent card and the JSON-RPC endpoint, over the gateway's API."""

    def __init__(self, api: Api) -> None:
        self.api = api
        try:
            self.version = metadata.version("edgecollab")
        except metadata.PackageNotFoundError:
            self.version = "0.0.0"

    def routes(self) -> list[Route]:
        return [
            Route(CARD_PATH, self.card, methods=["GET"]),
            Route("/.well-known/agent.json", self.card, methods=["GET"]),  # A2A 0.2's path
            Route("/a2a", self.rpc, methods=["POST"]),
        ]

    async def card(self, request: Request) -> Response:
        return JSON(self.agent_card(str(request.base_url).rstrip("/")))

    def agent_card(self, base: str) -> dict[str, Any]:
        """The cluster's card, from the agents online in the CMS now."""
        serving: dict[str, list[str]] = {"general": []}
        for agent in self.api.view.agents():
            if agent.online and agent.card.kind in ("worker", "sensor"):
                for domain in agent.card.domains or (
                    ["general"] if agent.card.kind == "worker" else []
                ):
                    serving.setdefault(domain, []).append(agent.card.agent)
        return {
            "name": "edgecollab",
            "description": "Small language models on edge devices answering together over MQTT, "
            "with a cloud LLM only when the edge cannot serve; every answer names the agents, "
            "data and knowledge it was made of.",
            "supportedInterfaces": [
                {
                    "url": f"{base}/a2a",
                    "protocolBinding": "JSONRPC",
                    "protocolVersion": PROTOCOL_VERSION,
                }
            ],
            "provider": {"organization": "edgecollab", "url": base},
            "version": self.version,
            "documentationUrl": f"{base}/dashboard",
            "capabilities": {"streaming": True, "pushNotifications": False},
            "securitySchemes": {
                "bearer": {
                    "httpAuthSecurityScheme": {
                        "scheme": "Bearer",
                        "description": "an API key of the edgecollab gateway",
                    }
                }
            },
            "securityRequirements": [{"schemes": {"bearer": {"list": []}}}],
            "defaultInputModes": ["text/plain"],
            "defaultOutputModes": ["text/plain"],
            "skills": [_skill(domain, agents) for domain, agents in sorted(serving.items())],
        }

    async def rpc(self, request: Request) -> Response:
        try:
            tenant = self.api.authenticate(request)
        except ApiError as exc:
            return JSON(exc.body(), status_code=exc.status)
        try:
            call = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return JSON(_error(None, PARSE_ERROR, f"not JSON: {exc}"))
        if not isinstance(call, dict) or call.get("jsonrpc") != "2.0" or "method" not in call:
            return JSON(_error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 request"))
        rid, method, params = call.get("id"), call["method"], call.get("params") or {}
        try:
            if method == "SendMessage":
                return JSON(_result(rid, await self._send(params, tenant)))
            if method == "SendStreamingMessage":
                return await self._stream(rid, params, tenant)
            if method in ("GetTask", "CancelTask", "SubscribeToTask"):
                raise _RpcError(TASK_NOT_FOUND, "tasks are not kept: each message is answered")
            raise _RpcError(METHOD_NOT_FOUND, f"method {method!r} is not supported")
        except _RpcError as exc:
            return JSON(_error(rid, exc.code, str(exc)))

    def _query(self, params: dict[str, Any], tenant: str, *, stream: bool) -> Query:
        message = params.get("message") if isinstance(params, dict) else None
        parts = message.get("parts") if isinstance(message, dict) else None
        if not isinstance(parts, list):
            raise _RpcError(INVALID_PARAMS, "params.message.parts must be a list")
        text = "\n".join(
            p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
        if not text.strip():
            raise _RpcError(INVALID_PARAMS, "the message has no text part")
        if len(text) > MAX_TEXT:
            raise _RpcError(
                INVALID_PARAMS, f"the message has {len(text)} characters; at most {MAX_TEXT}"
            )
        return new_query(
            text,
            tenant=tenant,
            max_tokens=self.api.default_max_tokens,
            timeout_s=self.api.timeout_s,
            stream=stream,
            sampling=SamplingOptions(),
        )

    async def _send(self, params: dict[str, Any], tenant: str) -> dict[str, Any]:
        query = self._query(params, tenant, stream=False)
        context = _context_id(params)
        async with self.api.gateway.exchange(query) as exchange:
            assert exchange.answer is not None
            try:
                answer = await self.api.settle(query, exchange.answer)
            except ApiError as exc:
                return {
                    "task": _task(query, context, _state(exc), _agent_message(exc.message, context))
                }
        return {"message": _agent_message(answer.text, context, answer)}

    async def _stream(self, rid: Any, params: dict[str, Any], tenant: str) -> Response:
        query = self._query(params, tenant, stream=True)
        context = _context_id(params)
        stack = contextlib.AsyncExitStack()
        exchange = await stack.enter_async_context(self.api.gateway.exchange(query))
        pending = exchange.answer
        assert pending is not None
        task_id = query.request_id

        def event(result: dict[str, Any]) -> bytes:
            return b"data: " + orjson.dumps(_result(rid, result)) + b"\n\n"

        def piece(text: str, *, append: bool, last: bool) -> bytes:
            artifact = {"artifactId": "answer", "name": "answer", "parts": [{"text": text}]}
            return event(
                {
                    "artifactUpdate": {
                        "taskId": task_id,
                        "contextId": context,
                        "artifact": artifact,
                        "append": append,
                        "lastChunk": last,
                    }
                }
            )

        async def events() -> AsyncIterator[bytes]:
            async with stack:
                yield event({"task": _task(query, context, "TASK_STATE_WORKING")})
                streamed = ""
                while (text := await next_piece(exchange.chunks, pending)) is not None:
                    yield piece(text, append=bool(streamed), last=False)
                    streamed += text
                try:
                    answer = await self.api.settle(query, pending)
                except ApiError as exc:
                    status = _status(_state(exc), _agent_message(exc.message, context))
                    yield event(
                        {
                            "statusUpdate": {
                                "taskId": task_id,
                                "contextId": context,
                                "status": status,
                            }
                        }
                    )
                    return
                yield piece(exchange.transcript.rest(answer.text), append=bool(streamed), last=True)
                status = _status("TASK_STATE_COMPLETED")
                update = {
                    "taskId": task_id,
                    "contextId": context,
                    "status": status,
                    "metadata": {"edgecollab": extension(answer)},
                }
                yield event({"statusUpdate": update})

        return EventStream(events(), stack.aclose, headers={"cache-control": "no-cache"})


def _skill(domain: str, agents: list[str]) -> dict[str, Any]:
    who = ", ".join(sorted(agents)) if agents else "any edge worker, else the cloud"
    return {
        "id": domain,
        "name": f"{domain} questions",
        "description": f"Answers {domain} questions with the agents that serve it: {who}.",
        "tags": [domain, "edge", "slm"],
        "examples": [EXAMPLES[domain]] if domain in EXAMPLES else [],
    }


def _context_id(params: dict[str, Any]) -> str:
    message = params.get("message") or {}
    context = message.get("contextId") if isinstance(message, dict) else None
    return context if isinstance(context, str) and context else uuid.uuid4().hex


def _agent_message(text: str, context: str, answer: Answer | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "messageId": uuid.uuid4().hex,
        "contextId": context,
        "role": "ROLE_AGENT",
        "parts": [{"text": text}],
    }
    if answer is not None:
        message["metadata"] = {"edgecollab": extension(answer)}
    return message


def _state(error: ApiError) -> str:
    """A refusal (quota, a full edge) is a rejected task; anything else a failed one."""
    return "TASK_STATE_REJECTED" if error.status == 429 else "TASK_STATE_FAILED"


def _status(state: str, message: dict[str, Any] | None = None) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"state": state, "timestamp": now} | ({"message": message} if message else {})


def _task(query: Query, context: str, state: str, message: dict[str, Any] | None = None) -> dict:
    return {"id": query.request_id, "contextId": context, "status": _status(state, message)}


def _result(rid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}
