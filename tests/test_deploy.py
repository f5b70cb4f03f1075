"""docker-compose.yml, the Dockerfile and `edgecollab up` describe the same stack."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from tools.cli.contract import SCHEMA_DIR, rendered
from tools.common.broker import local_config
from tools.common.stack import STACK

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# The Compose Specification's JSON schema as shipped by the docker-compose 1.29.2 wheel
# (fetched by tools/setup.sh from PyPI; no Docker engine runs here).
SPEC_WHEEL = (
    ROOT / ".venv" / "share" / "compose-spec" / "docker_compose-1.29.2-py2.py3-none-any.whl"
)


def compose_spec() -> dict:
    assert SPEC_WHEEL.exists(), f"{SPEC_WHEEL} is missing: run tools/setup.sh"
    with zipfile.ZipFile(SPEC_WHEEL) as wheel:
        return json.loads(wheel.read("compose/config/compose_spec.json"))


def test_compose_file_is_valid_per_the_compose_specification():
    jsonschema.Draft201909Validator(compose_spec()).validate(COMPOSE)


def test_compose_validation_catches_a_broken_file():
    broken = {**COMPOSE, "services": {"x": {"command": 42, "image": "y"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(compose_spec()).validate(broken)


def test_every_compose_service_runs_the_same_command_as_edgecollab_up():
    services = {n: s for n, s in COMPOSE["services"].items() if n not in ("mosquitto", "init")}
    assert sorted(services) == sorted(spec.name for spec in STACK)
    for spec in STACK:
        assert services[spec.name]["command"] == spec.command("python"), spec.name
        env = services[spec.name]["environment"]
        assert env["EDGECOLLAB_MQTT_HOST"] == "mosquitto"
        # its own account, its secret as a file of the security volume (never in argv or env)
        assert env["EDGECOLLAB_MQTT_USERNAME"] == spec.agent
        assert env["EDGECOLLAB_MQTT_PASSWORD_FILE"] == f"/state/security/secrets/{spec.agent}"
        assert "EDGECOLLAB_MQTT_PASSWORD" not in env
        assert "security:/state/security:ro" in services[spec.name]["volumes"]
        assert env["EDGECOLLAB_STATE_DIR"] == "/state"  # the accounts' roles: who may be what


def test_compose_is_secure_with_no_extra_step():
    mosquitto, init = COMPOSE["services"]["mosquitto"], COMPOSE["services"]["init"]
    # the one-shot init makes accounts, ACL and certificates; the broker waits for it
    assert init["command"][:3] == ["edgecollab", "credentials", "init"]
    assert mosquitto["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert "security:/mosquitto/security:ro" in mosquitto["volumes"]
    # plain MQTT on this box only; the network gets TLS
    plain = [p for p in mosquitto["ports"] if p.endswith(":1883")]
    assert plain == ["127.0.0.1:1883:1883"]
    assert {p.rsplit(":", 1)[1] for p in mosquitto["ports"]} == {"1883", "8883", "8884"}


def test_compose_mounts_the_mosquitto_conf_the_tests_run():
    volumes = COMPOSE["services"]["mosquitto"]["volumes"]
    assert "./docker/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in volumes
    assert COMPOSE["services"]["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    text = local_config(
        1234, Path("/tmp/x"), security_dir=Path("/tmp/s"), tls_port=1235, cert_port=1236
    )
    original = (ROOT / "docker" / "mosquitto.conf").read_text()
    changed = set(text.splitlines()) ^ set(original.splitlines())
    user = {line for line in text.splitlines() if line.startswith("user ")}  # run as root
    assert changed - user == {
        *("listener 1883", "listener 1234 127.0.0.1"),
        *("listener 8883", "listener 1235 127.0.0.1"),
        *("listener 8884", "listener 1236 127.0.0.1"),
        "persistence_location /mosquitto/data/",
        "persistence_location /tmp/x/",
        *(
            f"{k} /mosquitto/security/{f}"
            for k, f in (("password_file", "passwd"), ("acl_file", "acl"))
        ),
        *(f"{k} /tmp/s/{f}" for k, f in (("password_file", "passwd"), ("acl_file", "acl"))),
        *(
            f"{k} /mosquitto/security/tls/{f}"
            for k, f in (
                ("cafile", "ca.crt"),
                ("certfile", "server.crt"),
                ("keyfile", "server.key"),
            )
        ),
        *(
            f"{k} /tmp/s/tls/{f}"
            for k, f in (
                ("cafile", "ca.crt"),
                ("certfile", "server.crt"),
                ("keyfile", "server.key"),
            )
        ),
    }
    assert "set_tcp_nodelay true" in original
    for secure in ("allow_anonymous false", "use_username_as_clientid true"):
        assert secure in original and secure in text


def test_the_broker_config_is_secure_and_only_the_baseline_is_not():
    text = local_config(1234, Path("/tmp/x"), security_dir=Path("/tmp/s"))
    assert "allow_anonymous false" in text and "acl_file /tmp/s/acl" in text
    assert "listener 8883" not in text and "listener 1234 127.0.0.1" in text  # no TLS asked
    baseline = local_config(1234, Path("/tmp/x"), secure=False)  # bench bus --security plain
    assert "allow_anonymous true" in baseline and "acl_file" not in baseline


def test_dockerfile_installs_the_package_and_every_service_module_exists():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "pip install ." in dockerfile
    for spec in STACK:
        assert (ROOT / spec.module.replace(".", "/") / "__main__.py").exists()


def test_checked_in_json_schemas_are_fresh():
    stale = [name for name, data in rendered().items() if (SCHEMA_DIR / name).read_bytes() != data]
    assert not stale, f"run `edgecollab schemas export`: stale {stale}"
