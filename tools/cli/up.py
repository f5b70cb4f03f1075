"""`edgecollab up`: the whole stack on this box, one process per service, as in compose.

Secure by default: on first start it makes every account, the ACL and the TLS certificates
under $EDGECOLLAB_STATE_DIR/security (`edgecollab credentials init`); the broker it starts
listens for plain MQTT on 127.0.0.1 only and for TLS on the network; each service connects
with its own account, its secret passed as a file.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from services.core.settings import RuntimeSettings
from tools import ROOT
from tools.common import add_broker_option, child_env, mqtt_settings
from tools.common.broker import CERT, TLS, broker_answers, reload_broker, start_mosquitto
from tools.common.credentials import Credentials, stack_identities
from tools.common.stack import STACK, ServiceSpec

MODELS_DIR = ROOT / "models"  # what tools/setup.sh exports


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("up", help="start the whole stack here (and mosquitto if needed)")
    parser.add_argument(
        "--only", nargs="+", metavar="SERVICE", help=f"start only these of: {_names()}"
    )
    parser.add_argument(
        "--tls-port", type=int, default=TLS, help=f"TLS + password listener ({TLS}; 0: none)"
    )
    parser.add_argument(
        "--cert-port", type=int, default=CERT, help=f"TLS + client certificate ({CERT}; 0: none)"
    )
    parser.add_argument(
        "--listen",
        default="0.0.0.0",
        metavar="ADDRESS",
        help="where the TLS listeners listen (default: every interface); plain MQTT is 127.0.0.1",
    )
    add_broker_option(parser)
    parser.set_defaults(func=up)


def _names() -> str:
    return ", ".join(spec.name for spec in STACK)


def up(args: argparse.Namespace) -> int:
    settings, state_dir = mqtt_settings(args, account=False), RuntimeSettings().state_dir
    specs = [s for s in STACK if not args.only or s.name in args.only]
    if args.only and len(specs) != len(args.only):
        raise SystemExit(f"edgecollab: unknown service in {args.only}; known: {_names()}")
    credentials = Credentials.of_state_dir(state_dir)
    if credentials.add(stack_identities()):
        print(f"up: made the stack's accounts in {credentials.root}", flush=True)
    credentials.ensure_tls()
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    if not broker_answers(settings.host, settings.port):
        if settings.host not in ("localhost", "127.0.0.1"):
            raise SystemExit(f"edgecollab: no broker answers at {settings.address}")
        print(f"up: starting mosquitto on port {settings.port} ({state_dir})", flush=True)
        broker = start_mosquitto(
            settings.port,
            state_dir,
            security_dir=credentials.root,
            tls_port=args.tls_port or None,
            cert_port=args.cert_port or None,
            tls_bind=args.listen,
        )
        children.append(("mosquitto", broker))
    else:
        reload_broker(state_dir)  # ours from before: it takes accounts made since
    models = os.environ.get("EDGECOLLAB_MODELS_DIR", str(MODELS_DIR))
    for spec in specs:
        env = child_env(credentials.settings(spec.agent, settings), EDGECOLLAB_MODELS_DIR=models)
        children.append((spec.name, _start(spec, env)))
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
