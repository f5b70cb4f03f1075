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
    services = {n: s for n, s in COMPOSE["services"].items() if n != "mosquitto"}
    assert sorted(services) == sorted(spec.name for spec in STACK)
    for spec in STACK:
        assert services[spec.name]["command"] == spec.command("python"), spec.name
        env = services[spec.name]["environment"]
        assert env["EDGECOLLAB_MQTT_HOST"] == "mosquitto"


def test_compose_mounts_the_mosquitto_conf_the_tests_run():
    volumes = COMPOSE["services"]["mosquitto"]["volumes"]
    assert "./docker/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in volumes
    assert COMPOSE["services"]["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    text = local_config(1234, Path("/tmp/x"))
    original = (ROOT / "docker" / "mosquitto.conf").read_text()
    changed = set(text.splitlines()) ^ set(original.splitlines())
    assert changed == {
        "listener 1883",
        "listener 1234 127.0.0.1",
        "persistence_location /mosquitto/data/",
        "persistence_location /tmp/x/",
    }
    assert "set_tcp_nodelay true" in original


def test_dockerfile_installs_the_package_and_every_service_module_exists():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "pip install ." in dockerfile
    for spec in STACK:
        assert (ROOT / spec.module.replace(".", "/") / "__main__.py").exists()


def test_checked_in_json_schemas_are_fresh():
    stale = [name for name, data in rendered().items() if (SCHEMA_DIR / name).read_bytes() != data]
    assert not stale, f"run `edgecollab schemas export`: stale {stale}"
