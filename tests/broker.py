"""A real mosquitto for the tests, run with docker/mosquitto.conf (accounts, ACL, TLS) on free
ports: every test connects with an account of its own, as the stack's services do."""

from __future__ import annotations

from pathlib import Path

from tools.common.broker import LocalBroker

ROOT = Path(__file__).resolve().parent.parent


class Broker(LocalBroker):
    """The test session's broker: stopped and restarted on the same ports by some tests; its
    folder is the session's state dir (the CLI finds its operator accounts there)."""
