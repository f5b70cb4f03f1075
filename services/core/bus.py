"""The MQTT 5 bus every service stands on (paho-mqtt on the asyncio loop: `connection.py`).

One `Bus` per process: it connects with a Last Will, reconnects with backoff and resubscribes,
validates every payload at the edge before a handler sees it, answers bad input with an
`Error`, and does request/response with Response Topic + Correlation Data and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Union

import structlog
from paho.mqtt.client import topic_matches_sub
from paho.mqtt.properties import Properties
from pydantic import TypeAdapter, ValidationError

from schemas import Accepted, Error, Message
from schemas.messages import ErrorCode
from services.core.connection import Connection, ConnectionLost, PublishProperties
from services.core.errors import (
    BadInput,
    DeadlineExceeded,
    NoSubscriber,
    NotAuthorized,
    PeerGone,
    RemoteError,
)
from services.core.retry import until_reachable
from services.core.settings import MqttSettings
from services.core.topics import ERRORS, REPLIES, Address, Topic
from services.core.wire import parse_payload, request_id_of

M = TypeVar("M", bound=Message)
log = structlog.get_logger("edgecollab.bus")

_DEDUP_WINDOW = 4096  # (response topic, correlation) pairs remembered to answer a request once
_NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason codes
_NOT_AUTHORIZED = 0x87


@dataclass(frozen=True, slots=True)
class Request(Generic[M]):
    """A validated incoming message and how to answer it."""

    topic: str
    params: dict[str, str]
    body: M
    reply_to: str | None
    correlation: bytes | None


Handler = Callable[[Request[Any]], Awaitable[Message | None]]
RawCallback = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True)
class _Route:
    topic: Topic | None  # None for raw routes
    subscription: str  # what is subscribed, maybe $share/<group>/...
    matcher: str  # filter that incoming topics are matched against
    handler: Handler | None = None
    listener: Callable[[Request[Any]], None] | None = None
    raw: RawCallback | None = None
    qos: int = 1


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    adapter: TypeAdapter[Any]
    peer: str | None = None  # the agent expected to answer, if one is
    sent: bool = False  # written to a connection (whose loss then loses the reply)


class Bus:
    """A service's connection to the broker, with typed routes and request/response."""

    def __init__(
        self,
        *,
        settings: MqttSettings,
        client_id: str,
        service: str,
        will: tuple[str, Message] | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.service = service
        self.reply_topic = REPLIES.format(client=client_id)
        self.connected = asyncio.Event()
        self._will = will
        self._routes: list[_Route] = []
        self._on_connect: list[Callable[[], Awaitable[None]]] = []
        self._pending: dict[bytes, _Pending] = {}
        self._seen: OrderedDict[tuple[str | None, bytes], None] = OrderedDict()
        self._client: Connection | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._adapters: dict[tuple[type[Message], ...], TypeAdapter[Any]] = {}
        self.errors_sent = 0  # bad input answered; tests and benchmarks read it
        self.sessions = 0  # connections made so far; counted before each one subscribes

    # -- declaring what this service listens to -------------------------------------------

    def serve(
        self, topic: Topic, handler: Handler, *, shared: str | None = None, **fixed: str
    ) -> None:
        """Answer requests on `topic` (its subtree too: unknown sub-topics get an Error)."""
        self._add(_Route(topic, *self._filters(topic, shared, fixed), handler=handler))

    def listen(
        self,
        topic: Topic,
        listener: Callable[[Request[Any]], None],
        *,
        shared: str | None = None,
        **fixed: str,
    ) -> None:
        """Receive events on `topic` in arrival order; the callback must not block."""
        self._add(_Route(topic, *self._filters(topic, shared, fixed), listener=listener))

    def listen_raw(self, topic_filter: str, callback: RawCallback, *, qos: int = 1) -> None:
        """Receive raw (topic, payload) in arrival order, e.g. the CMS mirror."""
        self._add(_Route(None, topic_filter, topic_filter, raw=callback, qos=qos))

    def on_connect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run after every (re)connection, once subscriptions are in place (the birth)."""
        self._on_connect.append(callback)

    @staticmethod
    def _filters(topic: Topic, shared: str | None, fixed: dict[str, str]) -> tuple[str, str]:
        matcher = topic.filter(**fixed) + "/#"  # '#' also matches the parent level itself
        subscription = f"$share/{shared}/{matcher}" if shared else matcher
        return subscription, matcher

    async def follow(
        self, topic: Topic, listener: Callable[[Request[Any]], None], **fixed: str
    ) -> None:
        """Like `listen`, on a running bus: returns once the broker has the subscription."""
        self._add(_Route(topic, *self._filters(topic, None, fixed), listener=listener))
        await self.connected.wait()
        assert self._client is not None
        await self._client.subscribe([(self._routes[-1].subscription, 1)])

    def _add(self, route: _Route) -> None:
        self._routes.append(route)

    # -- the connection --------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until cancelled: connect, subscribe, birth, dispatch; on loss, retry."""
        first = True
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            while True:  # each session that was up starts the backoff afresh
                retrying = until_reachable(
                    "bus.disconnected", first_s=0.1, broker=self.settings.address
                )
                async for attempt in retrying:
                    with attempt:
                        clean_start, first = first, False
                        await self._connect_once(clean_start)

    async def _connect_once(self, clean_start: bool) -> None:
        """One connection: raises ConnectionLost if it never came up, returns once it was up
        and then dropped."""
        try:
            async with self._connection(clean_start=clean_start) as connection:
                await self._session(connection)
        except ConnectionLost as exc:
            if not self.connected.is_set():
                raise
            log.warning("bus.disconnected", broker=self.settings.address, reason=str(exc))
        finally:
            self._client = None
            self.connected.clear()
            self._fail_sent("the connection to the broker was lost before the answer")

    async def _session(self, connection: Connection) -> None:
        self.sessions += 1  # what arrives from here on belongs to this session
        subscriptions = [(self.reply_topic, 1)] + [(r.subscription, r.qos) for r in self._routes]
        await connection.subscribe(subscriptions)
        self._client = connection
        self.connected.set()
        log.info("bus.connected", broker=self.settings.address, client_id=self.client_id)
        for callback in self._on_connect:
            await callback()
        await connection.closed()

    def _connection(self, *, clean_start: bool) -> Connection:
        will = None
        if self._will is not None:
            topic, body = self._will
            will = (topic, body.model_dump_json().encode())
        return Connection(
            self.settings,
            client_id=self.client_id,
            on_message=self._dispatch,
            clean_start=clean_start,
            will=will,
        )

    # -- publishing --------------------------------------------------------------------------

    async def publish(
        self, address: Address[M], body: M | None, *, expiry_s: float | None = None
    ) -> None:
        """Publish a model with its topic's QoS and retain flag; None (an empty payload)
        deletes a retained entry."""
        topic = address.topic
        if body is None and not topic.retained:
            raise ValueError(f"{address}: only a retained topic's entry can be deleted")
        props = None if expiry_s is None else PublishProperties(expiry_s=_expiry(expiry_s))
        payload = b"" if body is None else body.model_dump_json().encode()
        await self._publish_bytes(
            address, payload, qos=topic.qos, retain=topic.retained, props=props
        )

    async def _answer(self, reply_to: str, body: Message, correlation: bytes | None) -> None:
        """A reply on the requester's own response topic (MQTT 5 Response Topic)."""
        props = PublishProperties(correlation=correlation) if correlation else None
        payload = body.model_dump_json().encode()
        await self._publish_bytes(reply_to, payload, qos=1, retain=False, props=props)

    async def _publish_bytes(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        props: PublishProperties | None,
        on_ack: Callable[[int], None] | None = None,
    ) -> None:
        for _attempt in range(3):  # a publish caught by a reconnect is tried on the new one
            await self.connected.wait()
            assert self._client is not None
            try:
                self._client.publish(
                    topic, payload, qos=qos, retain=retain, props=props, on_ack=on_ack
                )
                await asyncio.sleep(0)  # let the loop write it out, and never starve the loop
                await self._client.drained()  # a full socket holds the publisher back
                return
            except ConnectionLost as exc:
                log.warning("bus.publish_retry", topic=topic, reason=str(exc))
                await asyncio.sleep(0.05)
        raise ConnectionLost(f"could not publish to {topic}")

    async def request(
        self,
        address: Address[M],
        body: M,
        *,
        deadline: float,
        peer: str | None = None,
        accept_within_s: float | None = None,
    ) -> Message:
        """Send a request and await one of its topic's replies; an `Error` reply raises
        RemoteError, and `abandon(peer)` raises PeerGone in the requests sent to that agent."""
        payload = body.model_dump_json().encode()
        return await self.request_raw(
            address, payload, deadline=deadline, peer=peer, accept_within_s=accept_within_s
        )

    async def request_raw(
        self,
        address: Address[Any],
        payload: bytes,
        *,
        deadline: float,
        peer: str | None = None,
        accept_within_s: float | None = None,
    ) -> Message:
        """`request` with the payload as bytes, as a device of any make might send it.

        Fails at once with NoSubscriber when the broker has nobody to give it to; an
        `Accepted` interim reply names the agent whose going offline then raises PeerGone, and
        with `accept_within_s` no `Accepted` by then raises PeerGone too (the one who got it
        died or froze before it said so). A lost connection raises PeerGone: replies sent
        while we were away are gone (session expiry 0)."""
        timeout = deadline - time.time()
        if timeout <= 0:
            raise DeadlineExceeded(f"deadline already passed for {address}")
        correlation = uuid.uuid4().bytes
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        replies = self._adapter((*address.topic.replies, Accepted, Error))
        self._pending[correlation] = _Pending(future, replies, peer)
        props = PublishProperties(
            expiry_s=_expiry(timeout), response_topic=self.reply_topic, correlation=correlation
        )

        pending = self._pending[correlation]

        def acked(reason: int) -> None:
            if future.done():
                return
            if reason == _NO_MATCHING_SUBSCRIBERS:
                future.set_exception(NoSubscriber(f"nobody is subscribed to {address}"))
            elif reason == _NOT_AUTHORIZED:
                who = self.settings.username or self.client_id
                future.set_exception(NotAuthorized(f"the broker refused {address} for {who!r}"))

        def unaccepted() -> None:
            if pending.peer is None and not future.done():
                gone = f"nobody accepted it on {address} within {accept_within_s} s"
                future.set_exception(PeerGone(gone))

        if accept_within_s is not None:
            timer = asyncio.get_running_loop().call_later(accept_within_s, unaccepted)
            future.add_done_callback(lambda _: timer.cancel())

        try:
            await self._publish_bytes(
                address, payload, qos=1, retain=False, props=props, on_ack=acked
            )
            pending.sent = True
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                return await future
        except TimeoutError:
            raise DeadlineExceeded(f"no answer on {address} within {timeout:.1f} s") from None
        finally:
            self._pending.pop(correlation, None)

    async def barrier(self, timeout: float = 30.0) -> None:
        """Return once every message the broker queued for us before this call has arrived.

        The broker handles one client's packets in order, so retained messages sent for our
        earlier SUBSCRIBEs reach us before this echo of a later PUBLISH.
        """
        correlation = b"barrier-" + uuid.uuid4().bytes
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = _Pending(future, self._adapter((Error,)))
        try:
            props = PublishProperties(correlation=correlation)
            await self._publish_bytes(self.reply_topic, b"", qos=1, retain=False, props=props)
            async with asyncio.timeout(timeout):
                await future
        finally:
            self._pending.pop(correlation, None)

    def _fail_sent(self, reason: str) -> None:
        for pending in self._pending.values():
            if pending.sent and not pending.future.done():
                pending.future.set_exception(PeerGone(reason))

    def abandon(self, peer: str, why: str = "went offline") -> None:
        """Fail at once the requests awaiting an answer from `peer`, which went offline."""
        for pending in self._pending.values():
            if pending.peer == peer and not pending.future.done():
                pending.future.set_exception(PeerGone(f"{peer} {why} before answering"))

    def _adapter(self, models: tuple[type[Message], ...]) -> TypeAdapter[Any]:
        adapter = self._adapters.get(models)
        if adapter is None:
            union: Any = Union[models]  # noqa: UP007 (a union built at run time)
            adapter = self._adapters[models] = TypeAdapter(union)
        return adapter

    # -- receiving ---------------------------------------------------------------------------

    def _dispatch(self, topic: str, payload: bytes, props: Properties | None) -> None:
        """Route one incoming message (called by the connection, in arrival order)."""
        try:
            if topic == self.reply_topic:
                self._resolve(topic, payload, props)
                return
            route = next((r for r in self._routes if topic_matches_sub(r.matcher, topic)), None)
            if route is None:
                log.debug("bus.unrouted", topic=topic)
            elif route.raw is not None:
                route.raw(topic, payload)
            elif route.handler is not None:
                assert self._tasks is not None
                self._tasks.create_task(self._serve(route, topic, payload, props))
            else:
                request = self._accept(route, topic, payload, props)
                if request is not None and route.listener is not None:
                    route.listener(request)
        except Exception:  # a listener's bug must not stop the service from reading
            log.exception("bus.dispatch_failed", topic=topic)

    def _accept(
        self, route: _Route, topic: str, payload: bytes, props: Properties | None
    ) -> Request[Any] | None:
        """Validate at the edge; bad input is answered with an Error and yields None."""
        reply_to = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        assert route.topic is not None
        try:
            params = route.topic.match(topic)
            if params is None:
                raise BadInput(
                    "unknown_topic", f"no such topic: {topic} (expects {route.topic.template})"
                )
            body = parse_payload(route.topic.payload, payload, self.settings.max_payload)
        except BadInput as exc:
            self._refuse(exc, topic, payload, reply_to, correlation)
            return None
        return Request(topic, params, body, reply_to, correlation)

    async def _serve(
        self, route: _Route, topic: str, payload: bytes, props: Properties | None
    ) -> None:
        request = self._accept(route, topic, payload, props)
        if request is None or self._is_duplicate(request.reply_to, request.correlation):
            return
        started = time.perf_counter()
        request_id = getattr(request.body, "request_id", None)
        bound = log.bind(topic=topic, request_id=request_id)
        bound.debug("request.received")
        assert route.handler is not None
        try:
            reply = await route.handler(request)
        except BadInput as exc:
            reply = self._error(exc.code, str(exc), topic, request_id)
            bound.warning("request.refused", code=exc.code, reason=str(exc))
        except Exception as exc:  # a handler bug must not kill the service
            bound.exception("request.failed")
            reply = self._error("internal", f"{type(exc).__name__}: {exc}", topic, request_id)
        if reply is not None and request.reply_to:
            await self._answer(request.reply_to, reply, request.correlation)
        bound.debug("request.done", ms=round((time.perf_counter() - started) * 1000, 2))

    def _is_duplicate(self, reply_to: str | None, correlation: bytes | None) -> bool:
        """A redelivery of a request already taken: keyed per requester (its response topic),
        so two clients may use the same correlation bytes."""
        if correlation is None:
            return False
        key = (reply_to, correlation)
        if key in self._seen:
            log.info("request.duplicate_dropped")
            return True
        self._seen[key] = None
        if len(self._seen) > _DEDUP_WINDOW:
            self._seen.popitem(last=False)
        return False

    def _refuse(
        self,
        exc: BadInput,
        topic: str,
        payload: bytes,
        reply_to: str | None,
        correlation: bytes | None,
    ) -> None:
        error = self._error(exc.code, str(exc), topic, request_id_of(payload))
        log.warning("input.refused", topic=topic, code=exc.code, reason=str(exc))
        target = reply_to or ERRORS.format(service=self.service)
        self.errors_sent += 1
        assert self._tasks is not None
        self._tasks.create_task(self._publish_error(target, error, correlation))

    async def _publish_error(self, target: str, error: Error, correlation: bytes | None) -> None:
        with contextlib.suppress(ConnectionLost):
            await self._answer(target, error, correlation)

    def _error(self, code: ErrorCode, message: str, topic: str, request_id: str | None) -> Error:
        return Error(
            code=code, message=message, service=self.service, topic=topic, request_id=request_id
        )

    async def acknowledge(self, request: Request[Any]) -> None:
        """Tell the requester this agent took its request (an `Accepted` interim reply)."""
        request_id = getattr(request.body, "request_id", None)
        if request.reply_to and request_id:
            accepted = Accepted(request_id=request_id, agent=self.client_id)
            await self._answer(request.reply_to, accepted, request.correlation)

    def report(self, code: ErrorCode, message: str, topic: str) -> None:
        """Tell errors/<service> about input dropped outside a request (e.g. a bad CMS entry)."""
        self._refuse(BadInput(code, message), topic, b"", None, None)

    def _resolve(self, topic: str, payload: bytes, props: Properties | None) -> None:
        correlation: bytes | None = getattr(props, "CorrelationData", None)
        pending = self._pending.get(correlation) if correlation else None
        if correlation is None or pending is None or pending.future.done():
            log.debug("reply.unclaimed", topic=topic)
            return
        if correlation.startswith(b"barrier-"):
            pending.future.set_result(None)
            return
        try:
            reply = pending.adapter.validate_json(payload)
        except ValidationError as exc:
            pending.future.set_exception(BadInput("bad_schema", f"malformed reply: {exc}"))
            return
        if isinstance(reply, Accepted):
            pending.peer = reply.agent  # taken: now its Last Will is what to watch for
        elif isinstance(reply, Error):
            pending.future.set_exception(RemoteError(reply))
        else:
            pending.future.set_result(reply)


def _expiry(seconds: float) -> int:
    """MQTT 5 Message Expiry Interval: whole seconds, at least 1 (0 would mean none)."""
    return max(1, math.ceil(seconds))
