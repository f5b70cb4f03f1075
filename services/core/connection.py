"""One MQTT 5 connection: paho-mqtt's client driven by the asyncio event loop.

The bus's hot path (every query passes four messages through it) runs on paho directly, as
DESIGN.md allows: aiomqtt costs about twice paho's CPU per message here, for a queue hop per
message received, a task and an event per QoS 1 publish, and a thread-safe wake-up per write.
Here paho parses on socket readiness and hands each message to `on_message` in the loop
thread; a publish is written out in the same loop iteration; a QoS 1 publish is not awaited
until its PUBACK (paho still tracks it), since a request's reply or deadline is what counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from services.core.settings import MqttSettings

log = structlog.get_logger("edgecollab.bus")

MessageCallback = Callable[[str, bytes, Any], None]  # topic, payload, paho Properties
_MISC_PERIOD_S = 1.0  # paho's keepalive bookkeeping (PINGREQ, dead-broker detection)


QUEUED_BEYOND_WINDOW = 64  # QoS 1 publishes paho may hold past its in-flight window


class PublishProperties(Properties):
    """The MQTT 5 properties a request or reply carries, packed once at construction.

    paho's `Properties` rebuilds its name tables per instance and scans them on every
    attribute set and on packing: ~0.1 ms per message, on each of the four hops of a query.
    paho only calls `pack()` on the properties of an outgoing PUBLISH.
    """

    _packed: bytes

    def __init__(
        self,
        *,
        expiry_s: int | None = None,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:  # no super().__init__(): nothing reads these back
        packed = b""
        if expiry_s is not None:
            packed += b"\x02" + struct.pack("!I", expiry_s)
        if response_topic is not None:
            topic = response_topic.encode()
            packed += b"\x08" + struct.pack("!H", len(topic)) + topic
        if correlation is not None:
            packed += b"\x09" + struct.pack("!H", len(correlation)) + correlation
        object.__setattr__(self, "_packed", VariableByteIntegers.encode(len(packed)) + packed)

    def pack(self) -> bytes:
        return self._packed

    def __repr__(self) -> str:
        return f"PublishProperties({self._packed!r})"

    __str__ = __repr__


class ConnectionLost(Exception):
    """The broker refused us, could not be reached, or the connection dropped."""


class Connection:
    """`async with Connection(...) as conn:` connects (or raises ConnectionLost);
    `await conn.closed()` raises ConnectionLost once the connection drops."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        on_message: MessageCallback,
        clean_start: bool = True,
        will: tuple[str, bytes] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._settings, self._clean_start, self._timeout = settings, clean_start, timeout
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[Any]]] = {}
        self._pubacks: dict[int, Callable[[int], None]] = {}  # mid -> called with the reason
        self._flush_scheduled = False
        self._writer_added = False
        self._drained = asyncio.Event()  # clear while the socket is full and packets wait
        self._drained.set()
        self._acked = asyncio.Event()  # set by each PUBACK: the in-flight window moved on
        self._dropped = False  # set when we give up on the socket; late callbacks then no-op
        self._misc: asyncio.Task[None] | None = None
        self._paho = client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self._tls = settings.uses_tls
        try:
            if settings.username is not None:
                client.username_pw_set(settings.username, settings.secret())
            if self._tls:
                client.tls_set_context(settings.tls_context())
        except (ValueError, OSError) as exc:  # an unreadable password file, a bad certificate
            raise ConnectionLost(str(exc)) from None
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        # paho keeps 20 QoS 1 publishes in flight and queues the rest: mosquitto's default
        # Receive Maximum, which a client must not exceed (paho cannot adopt the broker's own)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_paho_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    # -- lifetime ----------------------------------------------------------------------------

    async def __aenter__(self) -> Connection:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._settings.session_expiry_s
        host, port, keepalive = self._settings.host, self._settings.port, self._settings.keepalive
        try:
            async with asyncio.timeout(self._timeout):
                # paho's connect resolves and opens the socket blocking: keep it off the loop
                await self._loop.run_in_executor(
                    None,
                    lambda: self._paho.connect(
                        host, port, keepalive, clean_start=self._clean_start, properties=props
                    ),
                )
                await self._connack
        except (OSError, TimeoutError) as exc:
            self._close_socket()
            raise ConnectionLost(str(exc) or type(exc).__name__) from None
        except BaseException:
            self._close_socket()
            raise
        self._misc = asyncio.create_task(self._keepalive())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._misc is not None:
            self._misc.cancel()
        if not self._lost.done():
            self._paho.disconnect()  # queued after every publish, so those go out first
            self._flush()
            with contextlib.suppress(TimeoutError, ConnectionLost):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(self._lost)
        self._close_socket()

    def _close_socket(self) -> None:
        """Drop the socket now (paho closes it itself once a DISCONNECT is written)."""
        self._dropped = True
        sock = self._paho.socket()
        if sock is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            sock.close()

    async def closed(self) -> None:
        """Wait until the connection drops; raises ConnectionLost with the reason."""
        await asyncio.shield(self._lost)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(_MISC_PERIOD_S)
            self._paho.loop_misc()

    # -- operations --------------------------------------------------------------------------

    async def subscribe(self, subscriptions: list[tuple[str, int]]) -> None:
        """Subscribe and wait for the SUBACK; a refused filter raises ConnectionLost."""
        rc, mid = self._paho.subscribe(subscriptions)
        self._raise_for(rc, "subscribe")
        assert mid is not None
        future = self._subacks[mid] = self._loop.create_future()
        try:
            async with asyncio.timeout(self._timeout):
                codes = await future
        except TimeoutError:
            raise ConnectionLost(f"no SUBACK within {self._timeout:.0f} s") from None
        finally:
            self._subacks.pop(mid, None)
        refused = [
            f"{t}: {c}" for (t, _), c in zip(subscriptions, codes, strict=True) if c.is_failure
        ]
        if refused:
            raise ConnectionLost(f"subscription refused: {', '.join(refused)}")

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        props: PublishProperties | None,
        on_ack: Callable[[int], None] | None = None,
    ) -> None:
        """Queue a publish; it is written out in this loop iteration. `on_ack` gets the
        reason code of a QoS 1 publish's PUBACK (0x10: the broker had no subscriber)."""
        info = self._paho.publish(topic, payload, qos, retain, props)
        self._raise_for(info.rc, f"publish to {topic}")
        if on_ack is not None and qos > 0:
            self._pubacks[info.mid] = on_ack

    @property
    def held_back(self) -> bool:
        """Whether a publish must wait: the socket is full, or more QoS 1 publishes wait in
        paho's memory for a PUBACK than its in-flight window (the broker's Receive Maximum)
        lets out, so a broker that stalls stops its publishers instead of growing them."""
        paho_client: Any = self._paho
        waiting = len(paho_client._out_messages) - paho_client._max_inflight_messages
        return not self._drained.is_set() or waiting > QUEUED_BEYOND_WINDOW

    async def drained(self) -> None:
        """Return once a publish may go on (`held_back` is over); raises ConnectionLost if
        the connection drops first."""
        while self.held_back:
            self._acked.clear()
            event = self._acked if self._drained.is_set() else self._drained
            waiter = asyncio.ensure_future(event.wait())
            either: set[asyncio.Future[Any]] = {waiter, self._lost}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if self._lost.done():
                await self.closed()

    def _raise_for(self, rc: MQTTErrorCode, what: str) -> None:
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"could not {what}: {paho.error_string(rc)}")

    # -- paho's callbacks (in the loop thread, except during connect) ------------------------

    def _call_in_loop(self, callback: Callable[[], object]) -> None:
        if threading.get_ident() == self._loop_thread:
            callback()
        else:
            self._loop.call_soon_threadsafe(callback)

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(ConnectionLost(f"broker refused the connection: {reason}"))
            return
        self._connack.set_result(None)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        lost = ConnectionLost(f"disconnected: {reason}")
        futures: list[asyncio.Future[Any]] = [self._connack, self._lost, *self._subacks.values()]
        for future in futures:
            if not future.done():
                future.set_exception(lost)
        self._lost.exception()  # retrieved here: nobody may be waiting on a closing connection

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[Any], _props: Any) -> None:
        future = self._subacks.get(mid)
        if future is not None and not future.done():
            future.set_result(codes)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        """A broker's PUBACK: a refusal (0x87 not authorized: the ACL) is said, not swallowed."""
        self._call_in_loop(self._acked.set)
        if getattr(reason, "is_failure", False):
            message = self._paho._out_messages.get(mid)  # paho drops it after this callback
            topic = message.topic if message is not None else None
            log.warning("bus.publish_refused", topic=topic, reason=str(reason))
        callback = self._pubacks.pop(mid, None)
        if callback is not None:
            self._call_in_loop(lambda: callback(int(getattr(reason, "value", reason))))

    def _on_paho_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        payload = bytes(message.payload)  # paho hands out a slice of its read buffer
        self._on_message(message.topic, payload, getattr(message, "properties", None))

    def _on_socket_open(self, _c: Any, _u: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else ~88 ms per round trip

        def watch() -> None:
            if self._dropped:  # a connect we gave up on finished late in its thread
                sock.close()
            elif sock.fileno() >= 0:
                self._loop.add_reader(sock, self._read_tls if self._tls else self._paho.loop_read)

        self._call_in_loop(watch)

    def _read_tls(self) -> None:
        """paho reads a few packets per call; TLS may hold more, already decrypted, where the
        selector cannot see them: read on while the TLS socket has bytes pending."""
        self._paho.loop_read()
        sock: Any = self._paho.socket()  # an ssl.SSLSocket while TLS is on
        while sock is not None and (pending := sock.pending()) > 0:
            self._paho.loop_read()
            sock = self._paho.socket()
            if sock is not None and sock.pending() >= pending:
                break  # no progress: wait for the socket

    def _on_socket_close(self, _c: Any, _u: Any, sock: Any) -> None:
        def forget() -> None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            self._writer_added = False

        self._call_in_loop(forget)

    def _on_register_write(self, _c: Any, _u: Any, _sock: Any) -> None:
        # Coalesce: one flush per loop iteration writes every packet queued until then.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._call_in_loop(lambda: self._loop.call_soon(self._flush))

    def _on_unregister_write(self, _c: Any, _u: Any, sock: Any) -> None:
        if self._writer_added:
            self._writer_added = False
            self._call_in_loop(lambda: self._loop.remove_writer(sock))
            self._call_in_loop(self._drained.set)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._dropped:
            return
        self._paho.loop_write()
        sock = self._paho.socket()
        if self._paho.want_write() and sock is not None and not self._writer_added:
            self._writer_added = True  # the socket is full: finish when it drains
            self._drained.clear()
            self._loop.add_writer(sock, self._paho.loop_write)
