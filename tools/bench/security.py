"""`edgecollab bench security`: the attacks once measured on a fresh stack, run against a live
one; prints as JSON what got through (the target: 0 everywhere).

By default it starts a stack of its own, secure as `edgecollab up` starts it (a private broker,
orchestrator-1, an emulated worker-1, wearable-1); `--live` attacks the stack that runs at
--broker (default localhost:1883) with the accounts of $EDGECOLLAB_STATE_DIR, adding the
attacker's accounts there (the broker is told to reload: it must be the one `up` started).

The attacker is an anonymous client on loopback, then a client account of its own
(`mallory-<tag>`) and a device account (`mallory-dev-<tag>`): what a stolen device or app key
gives. The victim is the operator's CLI account on the box.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr

from services.core.settings import MqttSettings, RuntimeSettings
from services.core.topics import (
    AGENT_CARD,
    AGENT_STATUS,
    ERRORS,
    PARAMETER,
    QUERIES,
    READING,
    REMOTE_AGENT_CARD,
    REPLICA_CHANGES,
    REPLIES,
)
from tools import ROOT
from tools.common import add_broker_option, mqtt_settings, print_json, spawn, stop
from tools.common.broker import TLS, LocalBroker, reload_broker
from tools.common.credentials import CERTS_SCRIPT, Credentials, stack_identities
from tools.common.security import Identity, Role
from tools.common.stack import ServiceSpec

TIMEOUT_S = 10.0
FORGED = "FORGED: the attacker wrote this"
SPOOFED_BPM = 199.0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("security", help="attack a live stack; what got through (JSON)")
    parser.add_argument("--live", action="store_true", help="attack the stack at --broker")
    parser.add_argument("--tls-port", type=int, default=TLS, help="--live: its TLS port")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="the same attacks on a broker as it was before security (anonymous, no ACL)",
    )
    add_broker_option(parser)
    parser.set_defaults(func=bench)


# -- a blocking MQTT client for the attacker and the victim ----------------------------------


class Client:
    """paho on a thread of its own: connect, publish and wait for the PUBACK's reason, read."""

    def __init__(self, settings: MqttSettings, *, client_id: str | None = None) -> None:
        self.settings = settings
        self.name = settings.username or client_id or f"anonymous-{uuid.uuid4().hex[:8]}"
        self.paho = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.name if client_id is None else client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if settings.username is not None:
            self.paho.username_pw_set(settings.username, settings.secret())
        if settings.uses_tls:
            self.paho.tls_set_context(settings.tls_context())
        self.connack: str | None = None
        self.disconnected = 0
        self.messages: list[tuple[str, bytes, Any]] = []
        self.on_message: Callable[[paho.MQTTMessage], None] | None = None
        self._acks: dict[int, str] = {}
        self._changed = threading.Condition()
        self.paho.on_connect = self._connected
        self.paho.on_disconnect = self._disconnected
        self.paho.on_publish = self._published
        self._subacks: set[int] = set()
        self.paho.on_subscribe = lambda _c, _u, mid, _r, _p: self._note(
            lambda: self._subacks.add(mid)
        )
        self.paho.on_message = self._message

    def connect(self) -> bool:
        """True when the broker answered CONNACK success."""
        try:
            self.paho.connect(self.settings.host, self.settings.port, keepalive=30)
        except OSError:  # refused, or a TLS handshake that failed
            return False
        self.paho.loop_start()
        self._wait(lambda: self.connack is not None)
        if self.connack != "Success":
            return False
        self.subscribe(REPLIES.format(client=self.name))  # its own inbox: replies, fences
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        self.paho.loop_stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, **props: Any) -> str:
        """A QoS 1 publish's PUBACK: "Success" when taken, else its reason ("Not authorized")."""
        properties = None
        if props:
            properties = Properties(PacketTypes.PUBLISH)
            for name, value in props.items():
                setattr(properties, name, value)
        info = self.paho.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if not self._wait(lambda: info.mid in self._acks):
            return "no PUBACK"
        return self._acks.pop(info.mid)

    def subscribe(self, *filters: str) -> None:
        """Subscribe and wait for the SUBACK."""
        _, mid = self.paho.subscribe([(f, 1) for f in filters])
        self._wait(lambda: mid in self._subacks)

    def fence(self) -> None:
        """Return once every message the broker queued for us before this call has arrived
        (it handles one client's packets in order: the echo of our publish comes after)."""
        marker = uuid.uuid4().bytes
        self.publish(REPLIES.format(client=self.name), marker)
        self._wait(lambda: any(m[1] == marker for m in self.messages))

    def request(self, topic: str, payload: bytes, timeout: float = TIMEOUT_S) -> bytes | None:
        """A request on our own response topic; its reply, or None."""
        correlation = uuid.uuid4().bytes
        reply_to = REPLIES.format(client=self.name)
        self.publish(topic, payload, ResponseTopic=reply_to, CorrelationData=correlation)
        found: list[bytes] = []

        def answered() -> bool:
            found[:] = [m[1] for m in self.messages if _correlation(m[2]) == correlation]
            return bool(found)

        return found[0] if self._wait(answered, timeout) else None

    def _wait(self, done: Callable[[], bool], timeout: float = TIMEOUT_S) -> bool:
        with self._changed:
            return self._changed.wait_for(done, timeout)

    def _note(self, change: Callable[[], None]) -> None:
        with self._changed:
            change()
            self._changed.notify_all()

    def _connected(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._note(lambda: setattr(self, "connack", str(reason)))

    def _disconnected(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        def note() -> None:
            self.disconnected += 1
            self.connack = self.connack or str(reason)

        self._note(note)

    def _published(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        said = str(reason) if reason.is_failure else "Success"  # or "No matching subscribers"
        self._note(lambda: self._acks.__setitem__(mid, said))

    def _message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(message)
        item = (message.topic, bytes(message.payload), getattr(message, "properties", None))
        self._note(lambda: self.messages.append(item))


def _correlation(props: Any) -> bytes | None:
    return getattr(props, "CorrelationData", None)


@contextlib.contextmanager
def connected(settings: MqttSettings, **options: Any) -> Iterator[Client]:
    client = Client(settings, **options)
    if not client.connect():
        raise SystemExit(f"bench security: {settings.username} could not connect")
    try:
        yield client
    finally:
        client.close()


def _query(text: str, *, stream: bool = False) -> bytes:
    body = {"v": 1, "type": "query", "request_id": uuid.uuid4().hex, "text": text}
    return orjson.dumps(body | {"max_tokens": 8, "stream": stream, "deadline": time.time() + 8})


def _answers(victim: Client, count: int, text: str = "hello") -> list[dict[str, Any]]:
    replies = (victim.request(QUERIES.format(), _query(text)) for _ in range(count))
    return [orjson.loads(r) if r else {"type": "none"} for r in replies]


def _card(agent: str, kind: str = "worker") -> bytes:
    card = {"v": 1, "type": "agent_card", "agent": agent, "kind": kind, "epoch": 999}
    card |= {"backend": "emulated", "tokens_per_s": 1e6, "concurrency": 1000}
    value = card | {"started_at": time.time()}
    return orjson.dumps({"v": 1, "type": "cms_entry", "value": value, "version": 999_000_000,
                         "updated_at": time.time(), "origin": agent})  # fmt: skip


def _status(agent: str) -> bytes:
    value = {"v": 1, "type": "agent_status", "agent": agent, "epoch": 999, "online": True}
    value |= {"updated_at": time.time()}
    return orjson.dumps({"v": 1, "type": "cms_entry", "value": value, "version": 999_000_001,
                         "updated_at": time.time(), "origin": agent})  # fmt: skip


def _entry(value: Any, origin: str) -> bytes:
    return orjson.dumps({"v": 1, "type": "cms_entry", "value": value, "version": 1,
                         "updated_at": time.time(), "origin": origin})  # fmt: skip


def _result(attempts: int, got_through: int, **detail: Any) -> dict[str, Any]:
    return {"attempts": attempts, "got_through": got_through, **detail}


# -- the attacks ------------------------------------------------------------------------------


class Attacks:
    """Each method runs one attack and says what got through."""

    def __init__(self, target: Target) -> None:
        self.t = target

    def anonymous_connect(self) -> dict[str, Any]:
        plain = self.t.address
        tls = plain.model_copy(update={"port": self.t.tls_port, "tls_ca": self.t.ca})
        accepted = [Client(s).connect() for s in (plain, tls)]
        return _result(2, sum(accepted), listeners=["plain", "tls"])

    def wrong_password(self) -> dict[str, Any]:
        guess = self.t.address.model_copy(
            update={"username": "worker-1", "password": SecretStr("guess")}
        )
        return _result(1, int(Client(guess).connect()))

    def sys_readable(self) -> dict[str, Any]:
        with connected(self.t.mallory) as mallory:
            mallory.subscribe("$SYS/#")
            mallory.fence()
            read = [m for m in mallory.messages if m[0].startswith("$SYS")]
        return _result(1, int(bool(read)), messages=len(read))

    def plain_port_on_the_network(self) -> dict[str, Any]:
        addresses = [
            a.address
            for nics in psutil.net_if_addrs().values()
            for a in nics
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
        ]
        answered = 0
        for address in addresses:
            with contextlib.suppress(OSError):
                socket.create_connection((address, self.t.address.port), timeout=1).close()
                answered += 1
        return _result(len(addresses), answered, addresses=addresses)

    def tls_with_a_wrong_ca(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as other:
            subprocess.run(["bash", str(CERTS_SCRIPT), other], check=True, capture_output=True)
            wrong = self.t.mallory.model_copy(
                update={"port": self.t.tls_port, "tls_ca": Path(other) / "ca.crt"}
            )
            return _result(1, int(Client(wrong).connect()))

    def fake_worker_card(self) -> dict[str, Any]:
        """A worker card and status for a made-up agent and for the attacker's own name; then
        20 queries: how many did the fake take? After it leaves, 10 more: how many fail?"""
        fake = f"fake-{self.t.tag}"
        with connected(self.t.mallory) as mallory:
            acks = []
            for agent in (fake, mallory.name):
                acks.append(
                    mallory.publish(AGENT_CARD.format(agent=agent), _card(agent), retain=True)
                )
                status = AGENT_STATUS.format(agent=agent)
                acks.append(mallory.publish(status, _status(agent), retain=True))
            served = _answers(self.t.victim, 20)
        taken = sum(a == "Success" for a in acks)
        by_fake = sum(_served_by(a, {fake, self.t.mallory.username}) for a in served)
        after = _answers(self.t.victim, 10)
        failed_after = sum(a.get("outcome") != "edge" for a in after)
        with connected(self.t.mallory) as mallory:  # leave no fake behind (if it was taken)
            for agent in (fake, mallory.name):
                mallory.publish(AGENT_STATUS.format(agent=agent), b"", retain=True)
                mallory.publish(AGENT_CARD.format(agent=agent), b"", retain=True)
        return _result(
            len(acks) + 30,
            taken + by_fake + failed_after,
            publishes_taken=taken,
            queries_served_by_the_fake=by_fake,
            queries_failed_after_it_left=failed_after,
            refused=sorted({a for a in acks if a != "Success"}),
        )

    def device_poses_as_a_worker(self) -> dict[str, Any]:
        """A device's account may publish its own card: one that says "worker"."""
        device = self.t.device
        agent = device.username or ""
        with connected(device) as dev:
            dev.publish(AGENT_CARD.format(agent=agent), _card(agent), retain=True)
            dev.publish(AGENT_STATUS.format(agent=agent), _status(agent), retain=True)
            served = _answers(self.t.victim, 10)
            dev.publish(AGENT_STATUS.format(agent=agent), b"", retain=True)
            dev.publish(AGENT_CARD.format(agent=agent), b"", retain=True)
        misrouted = sum(_served_by(a, {agent}) or a.get("outcome") != "edge" for a in served)
        return _result(10, misrouted, queries_sent_to_the_device_or_failed=misrouted)

    def empty_retained_deletes_a_card(self) -> dict[str, Any]:
        agent = self.t.worker
        with connected(self.t.mallory) as mallory:
            acks = [
                mallory.publish(AGENT_STATUS.format(agent=agent), b"", retain=True),
                mallory.publish(AGENT_CARD.format(agent=agent), b"", retain=True),
            ]
        gone = not self.t.card_present(agent)
        taken = sum(a == "Success" for a in acks)
        return _result(2, max(taken, 2 * gone), deletes_taken=taken, card_gone=gone)

    def cms_put_over_a_card(self) -> dict[str, Any]:
        """`edgecollab cms put agents/worker-1 '{"x":1}'` with the CLI's own account."""
        agent = self.t.worker
        cli = [sys.executable, "-m", "tools.cli.main", "cms", "put", f"agents/{agent}", '{"x":1}']
        cli += ["--broker", self.t.address.address]
        run = subprocess.run(cli, cwd=ROOT, env=self.t.cli_env, capture_output=True, text=True)
        replaced = not self.t.card_present(agent)
        return _result(1, int(run.returncode == 0 or replaced), cli_said=run.stderr.strip()[-200:])

    def client_id_takeover(self) -> dict[str, Any]:
        """Connect 8 times with the worker's client id: how often was the worker kicked off?"""
        agent, kicked = self.t.worker, 0
        with connected(self.t.victim_watcher) as watch:
            watch.subscribe(AGENT_STATUS.format(agent=agent), AGENT_CARD.format(agent=agent))
            watch.fence()
            before = len(watch.messages)
            for _ in range(8):
                thief = Client(self.t.mallory, client_id=agent)
                thief.connect()
                thief.close()
                watch.fence()  # a takeover's will (offline) or a re-announcement came first
            # a kicked agent announces its card again when it is back
            kicked = sum(m[0] == AGENT_CARD.format(agent=agent) for m in watch.messages[before:])
        return _result(8, min(8, kicked), worker_reconnects=kicked)

    def wildcard_reader(self) -> dict[str, Any]:
        """Subscribe to everything, let a query with its stream go by: what could be read?"""
        with connected(self.t.mallory) as mallory:
            mallory.subscribe("#", "computation/#", "replies/#", "knowledge/#", "data/#")
            mallory.fence()
            self.t.victim.request(QUERIES.format(), _query("my secret question", stream=True))
            mallory.fence()
            own = (REPLIES.format(client=mallory.name), f"computation/stream/{mallory.name}/")
            public = ("cms/agents/", "cms/slm/", "cms/parameters/", "cms/configs/", "cms/metrics/")
            read = [m[0] for m in mallory.messages if not m[0].startswith((*own, *public))]
        return _result(1, len(read), messages_read=len(read), topics=sorted(set(read))[:20])

    def forged_answers(self) -> dict[str, Any]:
        """Read queries to learn their correlation data, answer first with a forged text."""
        forged = {"v": 1, "type": "answer", "text": FORGED, "outcome": "edge", "steps": []}
        with connected(self.t.mallory) as mallory:
            acks: list[str] = []

            def answer(message: paho.MQTTMessage) -> None:
                props = getattr(message, "properties", None)
                reply_to = getattr(props, "ResponseTopic", None)
                if message.topic.startswith("computation/queries") and reply_to:
                    body = orjson.loads(message.payload)
                    reply = forged | {"request_id": body.get("request_id", "x"), "ms": 0.0}
                    props_out = Properties(PacketTypes.PUBLISH)
                    props_out.CorrelationData = _correlation(props) or b""
                    mallory.paho.publish(reply_to, orjson.dumps(reply), 1, False, props_out)

            mallory.on_message = answer
            mallory.subscribe("computation/queries", "$share/orchestrators/computation/queries")
            mallory.fence()
            victim = REPLIES.format(client=self.t.victim.name)
            acks.append(
                mallory.publish(victim, orjson.dumps(forged | {"request_id": "x", "ms": 0}))
            )
            answers = _answers(self.t.victim, 5)
        taken = sum(a.get("text") == FORGED for a in answers)
        return _result(6, taken + (acks[0] == "Success"), forged_answers_taken=taken)

    def parameter_writes(self) -> dict[str, Any]:
        """temperature 5 and repetition_penalty 5 by the attacker's accounts (the broker must
        refuse them) and by the operator (the worker must refuse them: out of its bounds)."""
        model = self.t.model
        keys = [
            PARAMETER.format(model=model, name=n) for n in ("temperature", "repetition_penalty")
        ]
        taken = 0
        for account in (self.t.mallory, self.t.device):
            with connected(account) as attacker:
                for key in keys:
                    taken += (
                        attacker.publish(key, _entry(5, attacker.name), retain=True) == "Success"
                    )
        worker_took = 0
        with connected(self.t.victim_watcher) as operator:
            operator.subscribe(ERRORS.format(service="worker"), *keys)
            operator.fence()
            before = {m[0]: m[1] for m in operator.messages if m[0] in keys}
            for key in keys:
                operator.publish(key, _entry(5, operator.name), retain=True)
                refused = operator._wait(
                    lambda k=key: any(k in m[1].decode(errors="replace") for m in operator.messages)
                )
                worker_took += not refused
            for key in keys:  # what was there before comes back
                operator.publish(key, before.get(key, b""), retain=True)
        return _result(
            2 * len(keys) + len(keys),
            taken + worker_took,
            attacker_writes_taken=taken,
            out_of_bounds_values_taken_by_the_worker=worker_took,
        )

    def spoofed_readings(self) -> dict[str, Any]:
        """400 readings under the wearable's id from another device's account."""
        sensor = self.t.sensor
        topic = READING.format(domain="health", stream="heart_rate", agent=sensor)
        reading = {"v": 1, "type": "reading", "agent": sensor, "domain": "health"}
        reading |= {"stream": "heart_rate", "value": SPOOFED_BPM, "unit": "bpm"}
        with connected(self.t.victim_watcher) as watch, connected(self.t.device) as device:
            watch.subscribe(topic)
            watch.fence()
            acks = [
                device.publish(topic, orjson.dumps(reading | {"ts": time.time()}))
                for _ in range(400)
            ]
            watch.fence()
            seen = sum(
                orjson.loads(m[1]).get("value") == SPOOFED_BPM
                for m in watch.messages
                if m[0] == topic
            )
        return _result(400, max(seen, sum(a == "Success" for a in acks)), readings_seen=seen)

    def spoofed_replication(self) -> dict[str, Any]:
        """Another site's entries and shared keys written straight into this site's CMS, and a
        peer publishing changes under another site's name (replication/from/<site>/changes)."""
        parameter = PARAMETER.format(model=self.t.model, name="temperature")
        change = orjson.dumps({"v": 1, "type": "replica_changes", "site": "site-1",
                               "records": [{"key": parameter.removeprefix("cms/"),
                                            "version": 10**9, "origin": "operator-1",
                                            "updated_at": time.time(), "value": 5.0}]})  # fmt: skip
        acks = []
        with connected(self.t.mallory) as mallory, connected(self.t.site) as peer:
            remote = REMOTE_AGENT_CARD.format(site="site-9", agent=self.t.worker)
            acks.append(mallory.publish(remote, _card(self.t.worker), retain=True))
            acks.append(mallory.publish(REPLICA_CHANGES.format(site="site-1"), change))
            acks.append(peer.publish(REPLICA_CHANGES.format(site="site-1"), change))  # not its name
            acks.append(peer.publish(parameter, _entry(5.0, "operator-1"), retain=True))
            if acks[0] == "Success":
                mallory.publish(remote, b"", retain=True)
        return _result(4, sum(a == "Success" for a in acks))

    def foreign_tenant(self) -> dict[str, Any]:
        """A client's query naming a tenant it is no member of (another's quota and session)."""
        body = orjson.loads(_query("hello")) | {"tenant": "default"}
        with connected(self.t.mallory) as mallory:
            reply = mallory.request(QUERIES.format(), orjson.dumps(body))
        answered = reply is not None and orjson.loads(reply).get("type") == "answer"
        said = orjson.loads(reply).get("code") if reply else None
        return _result(1, int(answered), refused_with=said)


def _served_by(answer: dict[str, Any], agents: set[str | None]) -> bool:
    return any(step.get("agent") in agents for step in answer.get("steps", []))


# -- the stack under attack --------------------------------------------------------------------


class Target:
    """Where the stack is, and the accounts of the attacker and of the victim."""

    def __init__(self, address: MqttSettings, credentials: Credentials, tls_port: int) -> None:
        self.address, self.credentials, self.tls_port = address, credentials, tls_port
        self.ca = credentials.ca
        self.tag = uuid.uuid4().hex[:6]
        self.worker, self.sensor = "worker-1", "wearable-1"
        self.cli_env: dict[str, str] = {}
        self.mallory = self.account(f"mallory-{self.tag}", Role.client)
        self.device = self.account(f"mallory-dev-{self.tag}", Role.sensor)
        self.site = self.account(f"peer-mallory-{self.tag}", Role.peer)  # a peer site gone bad
        seats = [credentials.operator_seat(), credentials.operator_seat()]
        if None in seats:
            raise SystemExit(f"bench security: no operator accounts in {credentials.root}")
        self.victim_settings = credentials.settings(seats[0] or "", address)
        self.victim_watcher = credentials.settings(seats[1] or "", address)
        self.victim = Client(self.victim_settings)
        self.model = "emulated"

    def account(self, name: str, role: Role) -> MqttSettings:
        self.credentials.add([Identity(name, role)])
        return self.credentials.settings(name, self.address)

    def reloaded(self, reload: Callable[[], bool]) -> None:
        if not reload():
            raise SystemExit("bench security: cannot make the broker reload its accounts")
        from tools.common.broker import until_accepted

        until_accepted(self.mallory)
        until_accepted(self.device)
        until_accepted(self.site)

    def wait_for_stack(self) -> None:
        """Until orchestrator-1, the worker and the wearable are online; note the model."""
        wanted = {"orchestrator-1", self.worker, self.sensor}
        with connected(self.victim_watcher) as watch:
            watch.subscribe("cms/agents/#")
            give_up = time.monotonic() + 120
            while time.monotonic() < give_up:
                watch.fence()
                cards, statuses = _agents(watch.messages)
                live = {a for a in wanted if a in cards and statuses.get(a) == cards[a]["epoch"]}
                if live == wanted:
                    model = cards[self.worker].get("model") or {}
                    self.model = model.get("name", "emulated")
                    return
                time.sleep(0.5)
        raise SystemExit(f"bench security: the stack is not online ({sorted(wanted)})")

    def card_present(self, agent: str) -> bool:
        with connected(self.victim_watcher) as watch:
            watch.subscribe(AGENT_CARD.format(agent=agent))
            watch.fence()
            cards, _ = _agents(watch.messages)
        return agent in cards and cards[agent].get("agent") == agent


def _agents(messages: list[tuple[str, bytes, Any]]) -> tuple[dict[str, Any], dict[str, int]]:
    """The latest card and the epoch of the latest online status of each agent."""
    cards: dict[str, Any] = {}
    statuses: dict[str, int] = {}
    for topic, payload, _ in messages:
        levels = topic.split("/")
        if len(levels) < 3 or levels[:2] != ["cms", "agents"]:
            continue
        value = orjson.loads(payload).get("value", {}) if payload else None
        if len(levels) == 3:
            if value is None:
                cards.pop(levels[2], None)
            else:
                cards[levels[2]] = value
        elif levels[3:] == ["status"] and value and value.get("online"):
            statuses[levels[2]] = value.get("epoch")
        elif levels[3:] == ["status"]:
            statuses.pop(levels[2], None)
    return cards, statuses


def _run(target: Target) -> dict[str, Any]:
    target.wait_for_stack()
    if not target.victim.connect():
        raise SystemExit("bench security: the operator's account could not connect")
    attacks = Attacks(target)
    results: dict[str, Any] = {}
    try:
        for name in (
            "anonymous_connect",
            "wrong_password",
            "sys_readable",
            "plain_port_on_the_network",
            "tls_with_a_wrong_ca",
            "fake_worker_card",
            "empty_retained_deletes_a_card",
            "cms_put_over_a_card",
            "client_id_takeover",
            "wildcard_reader",
            "forged_answers",
            "parameter_writes",
            "spoofed_readings",
            "device_poses_as_a_worker",
            "spoofed_replication",
            "foreign_tenant",
        ):
            results[name] = getattr(attacks, name)()
            print(f"bench security: {name}: {results[name]['got_through']}", file=sys.stderr)
    finally:
        target.victim.close()
    total = sum(r["got_through"] for r in results.values())
    return {"stack": target.address.address, "total_got_through": total, "attacks": results}


def bench(args: argparse.Namespace) -> int:
    if args.live:
        address = mqtt_settings(args, account=False)
        state_dir = RuntimeSettings().state_dir
        target = Target(address, Credentials.of_state_dir(state_dir), args.tls_port)
        target.cli_env = {**_env(), "EDGECOLLAB_STATE_DIR": str(state_dir)}
        target.reloaded(lambda: reload_broker(state_dir))
        print_json(_run(target))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp), secure=not args.baseline)
        if args.baseline:  # accounts nobody checks: the operator's, the attacker's
            broker.credentials.add(stack_identities())
            broker.credentials.ensure_tls()
        broker.start()
        procs = []
        try:
            target = Target(broker.anonymous, broker.credentials, broker.tls_port)
            target.cli_env = {**_env(), "EDGECOLLAB_STATE_DIR": str(broker.workdir)}
            target.reloaded(lambda: reload_broker(broker.workdir))
            for spec in _stack():
                account = broker.login(spec.agent, spec.role)
                procs.append(spawn(spec.local_command(), account, state_dir=broker.workdir))
            print_json(_run(target) | {"baseline": args.baseline})
        finally:
            stop(*procs)
            broker.stop()
    return 0


def _stack() -> list[ServiceSpec]:
    """The default stack's agents, with an emulated worker (no model needed)."""
    return [
        ServiceSpec("orchestrator", "services.orchestrator", ("--agent-id", "orchestrator-1")),
        ServiceSpec(
            "worker-1",
            "services.worker",
            ("--agent-id", "worker-1", "--tokens-per-s", "1000", "--domains", '["health"]'),
        ),
        ServiceSpec(
            "wearable-1", "services.sensor", ("--agent-id", "wearable-1", "--profile", "wearable")
        ),
    ]


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
