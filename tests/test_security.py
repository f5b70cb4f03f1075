"""Who may say what on the bus: accounts, ACLs from roles, TLS, and the checks services make.

Against the session's broker, which runs the secure docker/mosquitto.conf: the attacker is an
anonymous client, or an account of its own (a client, a device) trying what it must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from schemas import AgentCard, Answer, Error, Query, now
from services.core import cms
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.connection import Connection, ConnectionLost
from services.core.errors import RemoteError
from services.core.ownership import Accounts, is_operator, owner_problem
from services.core.presence import card_entry
from services.core.topics import (
    AGENT_CARD,
    AGENT_STATUS,
    ERRORS,
    PARAMETER,
    QUERIES,
    READING,
    REPLIES,
)
from tests.broker import ROOT
from tests.conftest import running, wait_for
from tests.test_stack import online
from tools.bench.security import Client
from tools.common.credentials import CERTS_SCRIPT, Credentials
from tools.common.security import CMS_PUBLIC, Identity, Role, acl, grants, password_line

DENIED = "Not authorized"  # PUBACK reason code 0x87


def card_payload(agent: str, kind: str = "worker", origin: str | None = None) -> bytes:
    entry = card_entry(AgentCard(agent=agent, kind=kind, epoch=5, started_at=now()))
    return entry.model_copy(update={"origin": origin or agent}).model_dump_json().encode()


# -- the ACL as a function of roles ------------------------------------------------------------


def test_the_acl_is_a_pure_function_of_the_roles():
    accounts = [Identity("worker-1", Role.worker), Identity("watch-7", Role.sensor)]
    accounts += [Identity("alice", Role.client), Identity("operator-1", Role.operator)]
    text = acl(accounts)
    assert text == acl(reversed(accounts)) == acl([*accounts, *accounts])
    assert "pattern readwrite replies/%u/#" in text  # each account's own inbox, by username
    assert "%c" not in text  # client ids are not trusted: the username is the client id
    worker = dict((t, a) for a, t in grants(Identity("worker-1", Role.worker)))
    assert worker["computation/tasks/worker-1/#"] == "read"  # its own inbox, nobody else's
    assert worker["cms/agents/worker-1/#"] == "write"
    assert not any(t.startswith("computation/tasks/+") for t in worker)
    device = grants(Identity("watch-7", Role.sensor))
    writes = sorted(t for a, t in device if a == "write")
    own = ["cms/agents/watch-7/#", "data/+/+/watch-7", "data/+/+/embeddings/watch-7"]
    assert writes == sorted([*own, "replies/+", "errors/+"])
    client = grants(Identity("alice", Role.client))
    assert not any(t.startswith(("replies/", "cms/")) for a, t in client if a != "read")
    assert not any(t.startswith(("cms/inference", "cms/cache", "data/")) for _, t in client)
    operator = [t for a, t in grants(Identity("operator-1", Role.operator)) if a == "write"]
    assert "cms/parameters/#" in operator and not any("agents" in t for t in operator)
    observer = grants(Identity("observer", Role.observer))
    assert all(access == "read" for access, _ in observer)


def test_only_operator_accounts_are_named_operator():
    with pytest.raises(ValueError, match="operator"):
        Identity("operator-x", Role.client)
    with pytest.raises(ValueError, match="operator"):
        Identity("boss", Role.operator)
    assert is_operator("operator-7") and not is_operator("operators") and not is_operator("op")


def test_a_password_line_is_mosquittos_pbkdf2_sha512():
    import base64
    import hashlib

    line = password_line("alice", "s3cret", salt=b"0123456789ab")
    name, rest = line.split(":", 1)
    _, algorithm, rounds, salt, digest = rest.split("$")
    assert (name, algorithm, rounds) == ("alice", "7", "101")
    expected = hashlib.pbkdf2_hmac("sha512", b"s3cret", base64.b64decode(salt), 101)
    assert base64.b64decode(digest) == expected


def test_the_views_ownership_rules():
    assert owner_problem("cms/agents/w-1/status", "w-1") is None
    assert "belongs to 'w-1'" in owner_problem("cms/agents/w-1", "mallory")
    assert "belongs to" in owner_problem("cms/metrics/w-1/tokens_used_total", "orch-2")
    assert "only an operator" in owner_problem("cms/parameters/m/temperature", "worker-1")
    assert owner_problem("cms/parameters/m/temperature", "operator-2") is None
    assert owner_problem("cms/cache/abc", "orch-1") is None


# -- accounts on disk ------------------------------------------------------------------------


def test_credentials_init_makes_private_files_and_prints_no_secret(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "credentials", "init", "--state-dir", tmp_path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    store = Credentials.of_state_dir(tmp_path)
    accounts = store.accounts()
    assert accounts["worker-1"] is Role.worker and accounts["observer"] is Role.observer
    secrets = [store.secret_file(name).read_text().strip() for name in accounts]
    assert len(set(secrets)) == len(secrets) and all(len(s) >= 40 for s in secrets)
    private = [store.root / "passwd", store.root / "acl", store.tls_dir / "ca.key"]
    private += [store.tls_dir / "server.key", *(store.secret_file(n) for n in accounts)]
    assert all(path.stat().st_mode & 0o077 == 0 for path in private)
    assert not any(secret in run.stdout + run.stderr for secret in secrets)
    again = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "credentials", "init", "--state-dir", tmp_path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "0 new account(s)" in again.stdout  # idempotent: secrets are kept
    assert [store.secret_file(n).read_text().strip() for n in accounts] == secrets


def test_a_service_secret_is_not_in_its_command_line_or_environment(broker, uid, spawn):
    worker = spawn("services.worker", "--agent-id", f"w-{uid}")
    secret = broker.login(f"w-{uid}", "worker").secret()
    assert secret
    shown = Path(f"/proc/{worker.pid}/cmdline").read_bytes()
    shown += Path(f"/proc/{worker.pid}/environ").read_bytes()
    assert secret.encode() not in shown and f"w-{uid}".encode() in shown


# -- the broker --------------------------------------------------------------------------------


def test_anonymous_and_wrong_passwords_are_refused(broker, login, uid):
    assert not Client(broker.anonymous).connect()
    tls = broker.anonymous.model_copy(
        update={"port": broker.tls_port, "tls_ca": broker.credentials.ca}
    )
    assert not Client(tls).connect()
    account = login(f"c-{uid}")
    guess = account.model_copy(update={"password_file": None, "password": SecretStr("guess")})
    assert not Client(guess).connect()
    assert Client(account).connect()


async def test_a_refused_connection_is_a_clear_error(broker):
    with pytest.raises(ConnectionLost, match="Not authorized"):
        async with Connection(broker.anonymous, client_id="nobody", on_message=print):
            pass


def test_tls_takes_the_right_ca_only_and_client_certificates_are_identities(
    broker, login, uid, tmp_path
):
    account = login(f"c-{uid}", tls=True)
    assert Client(account).connect()
    other = tmp_path / "other"
    subprocess.run(["bash", str(CERTS_SCRIPT), str(other)], check=True, capture_output=True)
    wrong = account.model_copy(update={"tls_ca": other / "ca.crt"})
    assert not Client(wrong).connect()  # the handshake fails: not our broker's CA
    plain_on_tls = account.model_copy(update={"tls_ca": None})
    assert not Client(plain_on_tls).connect()
    # the certificate listener: the certificate's CN is the account, no password
    device = f"dev-{uid}"
    login(device, "sensor")
    tls_dir = broker.credentials.tls_dir
    subprocess.run(["bash", str(CERTS_SCRIPT), str(tls_dir), "--client", device], check=True)
    certified = broker.anonymous.model_copy(
        update={
            "port": broker.cert_port,
            "username": device,
            "tls_ca": broker.credentials.ca,
            "tls_cert": tls_dir / f"{device}.crt",
            "tls_key": tls_dir / f"{device}.key",
        }
    )
    client = Client(certified)
    assert client.connect()
    reading = READING.format(domain="health", stream="heart_rate", agent=device)
    assert client.publish(reading, b"{}") == "Success"
    assert client.publish(AGENT_CARD.format(agent=f"w-{uid}"), b"{}") == DENIED
    client.close()
    no_certificate = certified.model_copy(update={"tls_cert": None, "tls_key": None})
    assert not Client(no_certificate).connect()


def test_sys_is_for_the_observer_only(broker, login, uid):
    observer = Credentials.of_state_dir(broker.workdir).settings("observer", broker.anonymous)
    for settings, expected in ((login(f"c-{uid}"), False), (observer, True)):
        client = Client(settings)
        assert client.connect()
        client.subscribe("$SYS/broker/version")
        client.fence()  # $SYS/broker/version is retained: it came first if readable
        assert any(m[0].startswith("$SYS") for m in client.messages) is expected
        client.close()


async def test_a_spoofed_card_or_status_is_refused_by_the_broker_and_by_every_view(login, uid):
    victim = f"w-{uid}"
    mallory = Client(login(f"mallory-{uid}"))
    device = Client(login(f"dev-{uid}", "sensor"))
    assert mallory.connect() and device.connect()
    for attacker in (mallory, device):
        assert attacker.publish(AGENT_CARD.format(agent=victim), card_payload(victim)) == DENIED
        assert attacker.publish(AGENT_STATUS.format(agent=victim), b"", retain=True) == DENIED
    mallory.close()
    # a replica's mistake the broker lets through (a replicator writes the shared families):
    # a parameter from an origin that is no operator; the views ignore it
    replicator = f"repl-{uid}"
    writer = Bus(settings=login(replicator, "replicator"), client_id=replicator, service="t")
    reader = Bus(settings=login(f"r-{uid}"), client_id=f"r-{uid}", service="t")
    view = CmsView(reader, accounts=Accounts(Path(os.environ["EDGECOLLAB_STATE_DIR"])
                                             / "security" / "accounts.json"))  # fmt: skip
    refused: list[str] = []
    view.on_change(lambda key, _entry: refused.append(key))
    async with running(writer), running(reader):
        await view.synced()
        forged = f"cms/parameters/m-{uid}/temperature"
        entry = card_entry(AgentCard(agent=victim, kind="worker", epoch=5, started_at=now()))
        payload = entry.model_copy(update={"value": 5.0, "origin": "mallory"}).model_dump_json()
        await writer._publish_bytes(forged, payload.encode(), qos=1, retain=True, props=None)
        # the device's own card, saying it is a worker: its account is a sensor
        own = AGENT_CARD.format(agent=f"dev-{uid}")
        assert device.publish(own, card_payload(f"dev-{uid}"), retain=True) == "Success"
        await writer.barrier()
        await reader.barrier()
        assert victim not in view.cards and f"dev-{uid}" not in view.cards
        assert view.get(forged) is None and view.get(own) is None
        assert reader.errors_sent >= 2  # each said on errors/t (code forbidden)
        mine = (forged, own)
        changed = [key for key in refused if key.startswith(mine)]  # no callback saw either
        await writer._publish_bytes(forged, b"", qos=1, retain=True, props=None)
    device.publish(own, b"", retain=True)
    device.close()
    assert changed == []


async def test_nobody_takes_another_agents_client_id(login, uid):
    agent = f"w-{uid}"
    arrived: list[str] = []
    worker = Connection(
        login(agent, "worker"), client_id=agent, on_message=lambda t, p, _: arrived.append(t)
    )
    async with worker:
        inbox = REPLIES.format(client=agent)
        await worker.subscribe([(inbox, 1)])
        for _ in range(3):
            thief = Client(login(f"mallory-{uid}"), client_id=agent)  # the broker renames it
            assert thief.connect()
            thief.close()
        worker.publish(inbox, b"still here", qos=1, retain=False, props=None)
        await wait_for(lambda: inbox in arrived)  # the same connection: never kicked off
        assert not worker._lost.done()


async def test_another_clients_replies_and_streams_are_unreadable_and_unforgeable(
    login, uid, spawn
):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.worker", "--agent-id", f"w-{uid}", "--tokens-per-s", "500")
    victim = Bus(settings=login(f"v-{uid}"), client_id=f"v-{uid}", service="t")
    view = CmsView(victim)
    mallory = Client(login(f"mallory-{uid}"))
    assert mallory.connect()
    mallory.subscribe("#", "replies/#", "computation/#", "cms/inference/#", "data/#")
    async with running(victim):
        await wait_for(online(view, f"orch-{uid}", f"w-{uid}"))
        forged = Answer(request_id="x", text="forged", outcome="edge", steps=[], ms=0.0)
        inbox = REPLIES.format(client=f"v-{uid}")
        assert mallory.publish(inbox, forged.model_dump_json().encode()) == DENIED
        query = Query(
            request_id=f"q-{uid}", text="a private question", stream=True, deadline=time.time() + 20
        )
        answer = await victim.request(QUERIES.format(), query, deadline=query.deadline)
    mallory.fence()  # what the broker sent mallory before this has arrived
    mallory.close()
    assert isinstance(answer, Answer) and answer.outcome == "edge" and answer.text != "forged"
    public = tuple(f.removesuffix("#") for f in CMS_PUBLIC)  # cms/agents/, cms/slm/, ...
    leaked = [t for t, _, _ in mallory.messages if not t.startswith(public)]
    own = REPLIES.format(client=f"mallory-{uid}")
    assert [t for t in leaked if t != own] == []
    assert AGENT_CARD.format(agent=f"w-{uid}") in {t for t, _, _ in mallory.messages}  # it reads


async def test_parameters_are_the_operators_and_stay_within_sane_bounds(login, uid, spawn):
    key = PARAMETER.format(model="emulated", name="temperature")
    for name, role in ((f"mallory-{uid}", "client"), (f"dev-{uid}", "sensor")):
        attacker = Client(login(name, role))
        assert attacker.connect()
        assert attacker.publish(key, card_payload(name), retain=True) == DENIED
        attacker.close()
    spawn("services.worker", "--agent-id", f"w-{uid}")
    operator = f"operator-{uid}"
    ops = Bus(settings=login(operator, "operator"), client_id=operator, service="cli")
    refusals: list[Error] = []
    ops.listen(ERRORS, lambda request: refusals.append(request.body), service="worker")
    view = CmsView(ops)
    async with running(ops):
        await wait_for(online(view, f"w-{uid}"))
        await cms.put(ops, key, 5.0, version=1)  # in the wire's bounds, not in the live ones
        await wait_for(lambda: any(e.topic == key for e in refusals))
        await cms.delete(ops, key)
    assert "refused: live values of temperature stay within 0.0-1.0" in refusals[-1].message


async def test_a_device_cannot_publish_under_another_devices_id(login, uid):
    victim, mallory = f"wear-{uid}", f"dev-{uid}"
    reader = Bus(settings=login(f"o-{uid}", "orchestrator"), client_id=f"o-{uid}", service="t")
    seen: list[str] = []
    for agent in (victim, mallory):  # (other tests' readings are retained too)
        reader.listen(
            READING, lambda request: seen.append(request.topic), domain="health", agent=agent
        )
    device = Client(login(mallory, "sensor"))
    login(victim, "sensor")
    assert device.connect()
    spoofed = {"v": 1, "type": "reading", "agent": victim, "domain": "health"}
    spoofed |= {"stream": "heart_rate", "value": 199, "unit": "bpm", "ts": time.time()}
    own = spoofed | {"agent": mallory}
    async with running(reader):
        topic = READING.format(domain="health", stream="heart_rate", agent=victim)
        assert device.publish(topic, json.dumps(spoofed).encode()) == DENIED
        mine = READING.format(domain="health", stream="heart_rate", agent=mallory)
        assert device.publish(mine, json.dumps(own).encode()) == "Success"
        await wait_for(lambda: mine in seen)  # after the spoofed one, had it gone through
    device.close()
    assert seen == [mine]


def test_the_cli_from_another_box_takes_an_account_and_tls(broker, login, uid, tmp_path):
    alice = login(f"alice-{uid}")
    address = f"{broker.host}:{broker.tls_port}"
    command = [sys.executable, "-m", "tools.cli.main", "agents", "--json", "--tls",
               "--tls-ca", str(broker.credentials.ca), "--broker", address,
               "--username", alice.username, "--password-file"]  # fmt: skip
    elsewhere = {**os.environ, "EDGECOLLAB_STATE_DIR": str(tmp_path)}  # no accounts here
    ok = subprocess.run(
        [*command, str(alice.password_file)], cwd=ROOT, env=elsewhere, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert isinstance(json.loads(ok.stdout), list)
    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    refused = subprocess.run(
        [*command, str(wrong)], cwd=ROOT, env=elsewhere, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    assert f"refused account 'alice-{uid}' over TLS" in refused.stderr


def test_the_cli_on_the_box_cannot_write_an_agents_card(broker, uid):
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "cms", "put", f"agents/w-{uid}", '{"x":1}',
         "--broker", f"{broker.host}:{broker.port}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 1 and "was not written" in run.stderr


def test_bench_security_finds_nothing_getting_through():
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "bench", "security"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    through = {name: a["got_through"] for name, a in report["attacks"].items()}
    assert report["total_got_through"] == 0, through
    assert report["attacks"]["spoofed_readings"]["attempts"] == 400


# -- tenants, quotas, sessions ----------------------------------------------------------------


async def test_a_tenant_at_its_quota_gets_a_quota_error_before_any_generation(login, uid, spawn):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.worker", "--agent-id", f"w-{uid}", "--tokens-per-s", "1000")
    operator, tenant, member = f"operator-{uid}", f"t-{uid}", f"c-{uid}"
    ops = Bus(settings=login(operator, "operator"), client_id=operator, service="cli")
    client = Bus(settings=login(member), client_id=member, service="t")
    outsider = Bus(settings=login(f"x-{uid}"), client_id=f"x-{uid}", service="t")
    view = CmsView(ops)

    def query(n: int, **fields: object) -> Query:
        return Query(
            request_id=f"q{n}-{uid}", text="hello", max_tokens=8, deadline=time.time() + 20,
            **fields,  # type: ignore[arg-type]
        )  # fmt: skip

    async with running(ops), running(client), running(outsider):
        await wait_for(online(view, f"orch-{uid}", f"w-{uid}"))
        await cms.put(ops, f"tenants/{tenant}/members", [member], version=1)
        await cms.put(ops, f"tenants/{tenant}/usage_limit", {"tokens": 60}, version=1)
        await ops.barrier()
        answers, refusal = [], None
        for n in range(20):  # each query spends its prompt and its 8 tokens
            try:
                answers.append(
                    await client.request(QUERIES.format(), query(n), deadline=time.time() + 20)
                )
            except RemoteError as exc:
                refusal = exc.error
                break
        with pytest.raises(RemoteError) as claimed:  # naming a tenant it is not a member of
            await outsider.request(
                QUERIES.format(), query(99, tenant=tenant), deadline=time.time() + 20
            )
        free = await outsider.request(QUERIES.format(), query(98), deadline=time.time() + 20)
        usage_key = f"cms/metrics/orch-{uid}/tenants"
        await wait_for(lambda: view.get(f"sessions/{member}/context") is not None)
        await wait_for(lambda: view.get(usage_key) is not None)
        spent = sum(s.prompt_tokens + s.output_tokens for a in answers for s in a.steps)
        await wait_for(lambda: view.get(usage_key).value[tenant]["tokens"] == spent)
        session = view.get(f"sessions/{member}/tokens_used").value
        context = view.get(f"sessions/{member}/context").value
        for key in ("members", "usage_limit"):
            await cms.delete(ops, f"tenants/{tenant}/{key}")
    assert answers and all(a.outcome == "edge" for a in answers)
    assert refusal is not None and refusal.code == "quota"
    assert f"tenant {tenant!r} used {spent} of its 60 tokens" in refusal.message
    assert spent + 8 > 60 >= spent  # refused exactly when the next one could pass the limit
    assert claimed.value.error.code == "forbidden" and isinstance(free, Answer)
    assert session == spent and context[-1]["q"] == "hello" and len(context) <= 4


def test_a_quota_holds_over_every_orchestrator_and_resets_each_period():
    from types import SimpleNamespace

    from services.core.errors import BadInput
    from services.orchestrator.tenants import Tenants

    now = [7200.0]
    callbacks: list = []
    view = SimpleNamespace(on_change=callbacks.append)
    tenants = Tenants(SimpleNamespace(client_id="orch-a"), view, clock=lambda: now[0])  # type: ignore[arg-type]

    def put(key: str, value: object, origin: str = "operator-1") -> None:
        entry = SimpleNamespace(value=value, origin=origin)
        callbacks[0](key, entry)

    put("cms/tenants/t/members", ["alice"])
    put("cms/tenants/t/usage_limit", {"tokens": 100, "period_s": 3600})
    put(
        "cms/metrics/orch-b/tenants",
        {"t": {"period": 2, "period_s": 3600.0, "tokens": 95}},
        "orch-b",
    )
    query = Query(request_id="q", text="hi", max_tokens=8, deadline=now[0] + 10)
    with pytest.raises(BadInput, match="used 95 of its 100 tokens") as raised:
        tenants.admit("alice", query)  # orch-b's usage counts here too
    assert raised.value.code == "quota"
    now[0] = 3 * 3600.0  # the next period: orch-b's count is of the last one
    assert tenants.admit("alice", query) == "t"
    assert tenants.tenant_of("bob", None) is None  # in no tenant: no limit
    with pytest.raises(BadInput, match="may not ask for tenant 't'"):
        tenants.tenant_of("bob", "t")


def test_an_operator_account_a_process_logs_in_with_is_not_a_free_seat_for_the_cli(tmp_path):
    """A test or bench that connects as an operator holds that account's seat: a CLI command
    started meanwhile takes another one (the same client id would kick the first one off;
    seen when the account's name sorted first)."""
    from tools.common.broker import LocalBroker

    broker = LocalBroker(tmp_path)  # accounts only, no broker needed
    broker.login("operator-0000", "operator")
    seat = "from tools.common.credentials import Credentials as C; import sys; "
    seat += "print(C.of_state_dir(__import__('pathlib').Path(sys.argv[1])).operator_seat())"
    taken = subprocess.run([sys.executable, "-c", seat, str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.strip() not in ("operator-0000", "None"), taken.stdout
    local = Credentials.of_state_dir(tmp_path)
    assert local.operator_seat() not in (None, "operator-0000")  # nor in this process
