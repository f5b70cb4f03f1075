"""`edgecollab up`: the whole stack on this box, one process per service, as in compose."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tools import ROOT
from tools.common import add_broker_option, mqtt_settings
from tools.common.broker import broker_answers, start_mosquitto
from tools.common.stack import STACK, ServiceSpec

MODELS_DIR = ROOT / "models"  # what tools/setup.sh exports
STATE_DIR = Path(os.environ.get("EDGECOLLAB_STATE_DIR", Path.home() / ".local/state/edgecollab"))


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("up", help="start the whole stack here (and mosquitto if needed)")
    parser.add_argument(
        "--only", nargs="+", metavar="SERVICE", help=f"start only these of: {_names()}"
    )
    parser.add_argument(
        "--site", help="this site's name (for the replicator; its broker state apart)"
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="URL",
        help="a peer site's broker, mqtt://host:port (repeat for each peer)",
    )
    add_broker_option(parser)
    parser.set_defaults(func=up)


def _names() -> str:
    return ", ".join(spec.name for spec in STACK)


def up(args: argparse.Namespace) -> int:
    settings = mqtt_settings(args)
    specs = [s for s in STACK if not args.only or s.name in args.only]
    if args.only and len(specs) != len(args.only):
        raise SystemExit(f"edgecollab: unknown service in {args.only}; known: {_names()}")
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    if args.peer and not args.site:
        raise SystemExit("edgecollab: --peer needs --site (every site needs its own name)")
    if not broker_answers(settings.host, settings.port):
        if settings.host not in ("localhost", "127.0.0.1"):
            raise SystemExit(f"edgecollab: no broker answers at {settings.address}")
        state = STATE_DIR / f"site-{args.site}" if args.site else STATE_DIR
        print(f"up: starting mosquitto on port {settings.port} ({state})", flush=True)
        children.append(("mosquitto", start_mosquitto(settings.port, state)))
    env = {
        "EDGECOLLAB_MODELS_DIR": str(MODELS_DIR),
        **os.environ,
        "EDGECOLLAB_MQTT_HOST": settings.host,
        "EDGECOLLAB_MQTT_PORT": str(settings.port),
    }
    if args.site:
        env["EDGECOLLAB_REPLICATOR_SITE"] = args.site
        env["EDGECOLLAB_REPLICATOR_PEERS"] = json.dumps(args.peer)
    children += [(spec.name, _start(spec, env)) for spec in specs]
    print(f"up: {len(specs)} services on {settings.address}; Ctrl-C stops them", flush=True)
    try:
        return _wait(children)
    finally:
        _stop(children)


def _start(spec: ServiceSpec, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        spec.local_command(),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches `up`, which stops the children in order
    )
    threading.Thread(target=_relay, args=(spec.name, proc), daemon=True).start()
    return proc


def _relay(name: str, proc: subprocess.Popen[bytes]) -> None:
    """Prefix each line of a child's output with its service name."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(f"{name:>14} | {line.decode(errors='replace')}")
        sys.stdout.flush()


def _wait(children: list[tuple[str, subprocess.Popen[bytes]]]) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"up: {name} exited with {proc.returncode}; stopping", flush=True)
                    return 1
    except KeyboardInterrupt:
        pass
    return 0


def _stop(children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    """Services first, all at once (they say offline), the broker last."""
    services = [p for name, p in children if name != "mosquitto"]
    brokers = [p for name, p in children if name == "mosquitto"]
    for group in (services, brokers):
        for proc in group:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in group:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
    print("up: stopped", flush=True)
