"""The HTTP API (Starlette on uvicorn): OpenAI's routes, A2A, /health, /metrics, the dashboard."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from schemas import Answer, Outcome, Query
from services.core.cms import CmsView
from services.core.embeddings import embed
from services.core.errors import DeadlineExceeded, NoSubscriber, RemoteError
from services.core.topics import TENANT
from services.gateway.a2a import A2A
from services.gateway.chat import (
    AUTO_MODEL,
    ChatRequest,
    EmbeddingsRequest,
    chunk,
    completion,
    extension,
    final_step,
    finish_reason,
    model_name,
    parse,
    provenance_headers,
    usage,
)
from services.gateway.dashboard import Dashboard
from services.gateway.errors import ApiError
from services.gateway.http import (
    JSON,
    EventStream,
    next_piece,
    not_allowed,
    not_found,
    read_json,
    sse,
)
from services.gateway.keys import KeyRing
from services.gateway.metrics import GatewayMetrics
from services.gateway.service import Gateway, new_query

log = structlog.get_logger("edgecollab.gateway")

SERVED = (Outcome.EDGE, Outcome.CLOUD, Outcome.REJECTED_TO_CLOUD)


class Api:
    """The routes, over one Gateway."""

    def __init__(
        self,
        *,
        gateway: Gateway,
        view: CmsView,
        keys: KeyRing,
        default_max_tokens: int,
        timeout_s: float,
    ) -> None:
        self.gateway = gateway
        self.view = view
        self.keys = keys
        self.default_max_tokens = default_max_tokens
        self.timeout_s = timeout_s
        self.metrics = GatewayMetrics(gateway, view)

    def app(self) -> Starlette:
        api = self._api
        routes = [
            Route("/v1/chat/completions", api("chat", self.chat), methods=["POST"]),
            Route("/v1/embeddings", api("embeddings", self.embeddings), methods=["POST"]),
            Route("/v1/models", api("models", self.models), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            *Dashboard(self.gateway, self.view).routes(),
            *A2A(self).routes(),
        ]
        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})

    # -- the OpenAI routes --------------------------------------------------------------------

    def _api(
        self, route: str, handler: Callable[[Request, str], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Authentication, errors in OpenAI's shape, and the request counters of a route."""

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request, self.authenticate(request))
            except ApiError as exc:
                response = JSON(exc.body(), status_code=exc.status)
                response.headers["x-edgecollab-error"] = exc.code or exc.type
            except Exception as exc:
                log.exception("request.failed", route=route)
                error = ApiError(500, f"internal error: {type(exc).__name__}", code="internal")
                response = JSON(error.body(), status_code=500)
            if not isinstance(response, StreamingResponse):  # a stream counts itself at its end
                outcome = response.headers.get("x-edgecollab-outcome") or response.headers.get(
                    "x-edgecollab-error", "ok"
                )
                self._count(route, response.status_code, outcome, started)
            return response

        return endpoint

    def _count(self, route: str, status: int, outcome: str, started: float) -> None:
        self.metrics.requests.labels(route, str(status), outcome).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise ApiError(401, "no API key: send 'Authorization: Bearer <key>'", code="no_key")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "the Authorization header must be 'Bearer <key>'", code="no_key")
        tenant = self.keys.tenant(key.strip())
        if tenant is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        disabled = self.view.get(TENANT.format(tenant=tenant, name="config/disabled"))
        if disabled is not None and disabled.value is True:
            raise ApiError(403, f"tenant {tenant} is disabled", code="tenant_disabled")
        return tenant

    async def chat(self, request: Request, tenant: str) -> Response:
        body = parse(ChatRequest, await read_json(request))
        self._check_model(body.model)
        query = new_query(
            body.prompt(),
            tenant=tenant,
            max_tokens=body.max_completion_tokens or body.max_tokens or self.default_max_tokens,
            timeout_s=min(body.timeout_s or self.timeout_s, self.timeout_s),
            stream=body.stream,
            sampling=body.sampling(),
        )
        if body.stream:
            return await self._stream(query, body)
        async with self.gateway.exchange(query) as exchange:
            assert exchange.answer is not None
            answer = await self.settle(query, exchange.answer)
        response = JSON(completion(answer, query, self._served_model(answer, body.model)))
        response.headers.update(provenance_headers(answer))
        return response

    async def settle(self, query: Query, pending: asyncio.Future[Answer]) -> Answer:
        """The answer, or the ApiError its outcome means; either way it is recorded."""
        try:
            answer = await pending
        except ApiError as exc:
            self.gateway.record(
                query, status=exc.status, outcome=exc.code or "error", answer=None, detail=str(exc)
            )
            raise
        error = self._outcome_error(answer)
        status = error.status if error else 200
        self.gateway.record(query, status=status, outcome=answer.outcome.value, answer=answer)
        spent = usage(answer)
        self.metrics.tokens.labels(query.tenant, "prompt").inc(spent["prompt_tokens"])
        self.metrics.tokens.labels(query.tenant, "completion").inc(spent["completion_tokens"])
        self.metrics.cloud_spend.inc(answer.cost_usd)
        if error is not None:
            raise error
        return answer

    def _outcome_error(self, answer: Answer) -> ApiError | None:
        """An answer that is not served means 429 (edge full, no cloud), 503 or 504."""
        if answer.outcome in SERVED:
            return None
        detail = next((s.detail for s in reversed(answer.steps) if s.detail), "") or answer.text
        workers = any(a.online for a in self.view.agents("worker"))
        if answer.outcome == Outcome.REJECTED:
            if not workers:
                return ApiError(
                    503, "no edge agent is online and no cloud is configured", code="no_agent"
                )
            return ApiError(
                429, f"the edge is full and no cloud is configured: {detail}", code="edge_full"
            )
        if "deadline" in detail or "within" in detail:
            return ApiError(504, f"deadline passed: {detail}", code="deadline")
        if not workers:
            return ApiError(503, f"no edge agent is online: {detail}", code="no_agent")
        return ApiError(502, f"the request failed: {detail}", type="server_error", code="failed")

    async def _stream(self, query: Query, body: ChatRequest) -> Response:
        """Server-sent events; an error before the first token is still a plain status."""
        stack = contextlib.AsyncExitStack()
        exchange = await stack.enter_async_context(self.gateway.exchange(query))
        pending = exchange.answer
        assert pending is not None
        first = asyncio.ensure_future(exchange.chunks.get())
        answered: Answer | None = None
        try:
            await asyncio.wait({first, pending}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done():
                answered = await self.settle(query, pending)  # raises the error, if any
        except BaseException:
            await stack.aclose()
            raise
        finally:
            first.cancel()
        pieces = [first.result()] if first.done() and not first.cancelled() else []
        model, started = body.model, time.perf_counter()

        async def events() -> AsyncIterator[bytes]:
            async with stack:
                async for event in stream():
                    yield event

        async def stream() -> AsyncIterator[bytes]:
            yield sse(chunk(query, model, {"role": "assistant", "content": ""}))
            for piece in pieces:
                yield sse(chunk(query, model, {"content": piece}))
            answer = answered
            if answer is None:
                while (more := await next_piece(exchange.chunks, pending)) is not None:
                    yield sse(chunk(query, model, {"content": more}))
                try:
                    answer = await self.settle(query, pending)
                except ApiError as exc:
                    self._count("chat", exc.status, exc.code or exc.type, started)
                    yield sse(exc.body())
                    return
            self._count("chat", 200, answer.outcome.value, started)
            rest = exchange.transcript.rest(answer.text)
            if rest:
                yield sse(chunk(query, model, {"content": rest}))
            served = self._served_model(answer, model)
            end = {"finish_reason": finish_reason(answer, query), "edgecollab": extension(answer)}
            yield sse(chunk(query, served, {}, **end))
            if body.include_usage:
                yield sse(chunk(query, served, {}, usage=usage(answer)) | {"choices": []})
            yield b"data: [DONE]\n\n"

        headers = {
            "cache-control": "no-cache",
            "x-edgecollab-request-id": query.request_id,
            "x-edgecollab-outcome": "streaming",
        }
        return EventStream(events(), stack.aclose, headers=headers)

    def _check_model(self, model: str) -> None:
        if model != AUTO_MODEL and model not in self._models():
            known = ", ".join([AUTO_MODEL, *self._models()])
            raise ApiError(
                404, f"no model {model!r}; known: {known}", code="model_not_found", param="model"
            )

    def _served_model(self, answer: Answer, requested: str) -> str:
        step = final_step(answer)
        if step is None:
            return requested
        if step.where == "cloud":
            return step.topic.removeprefix("cloud:")
        agent = self.view.agent(step.agent) if step.agent else None
        if agent is not None and agent.card.kind == "worker":
            return model_name(agent.card)
        return requested

    def _models(self) -> dict[str, list[dict[str, Any]]]:
        """Model name → the agents serving it, from the worker cards in the CMS."""
        found: dict[str, list[dict[str, Any]]] = {}
        for agent in self.view.agents("worker"):
            found.setdefault(model_name(agent.card), []).append(
                {"agent": agent.card.agent, "online": agent.online, "backend": agent.card.backend}
            )
        return found

    async def models(self, request: Request, tenant: str) -> Response:
        created = int(time.time())
        models = self._models()
        everyone = [a for agents in models.values() for a in agents]
        data = [_model(AUTO_MODEL, created, everyone, "any edge agent the orchestrator picks")]
        data += [_model(name, created, agents) for name, agents in sorted(models.items())]
        for name, agents in sorted(self._embedders().items()):
            data.append(_model(name, created, agents, "embeddings"))
        return JSON({"object": "list", "data": data})

    def _embedders(self) -> dict[str, list[dict[str, Any]]]:
        """Embedding models of the online classifiers (they serve computation/embed)."""
        found: dict[str, list[dict[str, Any]]] = {}
        for agent in self.view.agents("classifier"):
            if agent.online and agent.card.model is not None:
                found.setdefault(agent.card.model.name, []).append(
                    {"agent": agent.card.agent, "online": True, "backend": "onnx"}
                )
        return found

    async def embeddings(self, request: Request, tenant: str) -> Response:
        body = parse(EmbeddingsRequest, await read_json(request))
        known = self._embedders()
        if not known:
            raise ApiError(503, "no embedder is online (the classifier serves them)",
                           code="no_embedder")  # fmt: skip
        if body.model not in known:
            message = f"no embedding model {body.model!r}; known: {', '.join(sorted(known))}"
            raise ApiError(404, message, code="model_not_found", param="model")
        try:
            done = await embed(self.gateway.bus, body.texts(), timeout_s=self.timeout_s)
        except NoSubscriber:
            raise ApiError(503, "no embedder is online", code="no_embedder") from None
        except DeadlineExceeded:
            raise ApiError(504, "the embedder did not answer in time", code="deadline") from None
        except RemoteError as exc:
            raise ApiError(502, f"the embedder failed: {exc}", type="server_error") from None
        if body.dimensions is not None and body.dimensions != done.vectors.shape[1]:
            message = f"{done.model} has {done.vectors.shape[1]} dimensions"
            raise ApiError(400, message, param="dimensions")
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(done.vectors)
        ]
        self.metrics.tokens.labels(tenant, "embedding").inc(done.tokens)
        usage = {"prompt_tokens": done.tokens, "total_tokens": done.tokens}
        return JSON({"object": "list", "data": data, "model": done.model, "usage": usage})

    # -- operations ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        connected = self.gateway.bus.connected.is_set()
        counts = {
            kind: sum(a.online for a in self.view.agents(kind))
            for kind in ("orchestrator", "worker", "classifier")
        }
        status = "ok" if connected and counts["orchestrator"] else "degraded"
        body = {
            "status": status,
            "bus": "connected" if connected else "disconnected",
            "online": counts,
            "in_flight": self.gateway.in_flight,
        }
        return JSON(body, status_code=200 if connected else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(
            generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST.split(";")[0]
        )

    # -- the dashboard ------------------------------------------------------------------------


def _model(name: str, created: int, agents: list[dict[str, Any]], note: str = "") -> dict:
    body = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "edgecollab",
        "agents": agents,
    }
    return body | ({"description": note} if note else {})


def _encode(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
