"""`edgecollab up`: the whole stack on this box, one process per service, as in compose.

Secure by default: on first start it makes every account, the ACL and the TLS certificates
under $EDGECOLLAB_STATE_DIR/security (`edgecollab credentials init`); the broker it starts
listens for plain MQTT on 127.0.0.1 only and for TLS on the network; each service connects
with its own account, its secret passed as a file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
from pathlib import Path

from services.core.errors import ConfigError
from services.core.logging import configure_logging
from services.core.settings import MqttSettings, RuntimeSettings
from services.gateway.keys import ensure_key_file
from services.gateway.settings import GatewaySettings
from tools import ROOT
from tools.common import add_broker_option, child_env, mqtt_settings
from tools.common.broker import CERT, TLS, broker_answers, reload_broker, start_mosquitto
from tools.common.credentials import Credentials, stack_identities
from tools.common.scaling import Scaler, pools
from tools.common.security import Identity, Role, peer_account
from tools.common.stack import STACK, ServiceSpec, scaled
from tools.common.supervise import Child, Supervisor, relay

MODELS_DIR = ROOT / "models"  # what tools/setup.sh exports


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "up",
        help="start the whole stack here (and mosquitto if needed); restarts what exits",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="SERVICE", help=f"start only these of: {_names()}"
    )
    parser.add_argument(
        "--workers", type=_count, default=1, metavar="N",
        help="SLM workers worker-1 ... worker-N (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--emulated-workers", type=_count, default=0, metavar="N",
        help="also N emulated devices emulated-1 ... emulated-N (sleep per token)",
    )  # fmt: skip
    parser.add_argument(
        "--max-instances", type=_count, default=8, metavar="N",
        help="most workers of one model that cms/scaling/<model>/desired_instances may ask for "
        "(default 8)",
    )  # fmt: skip
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


def _count(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"want a whole number from 0 to 64, got {text!r}")
    return int(text)


def _names() -> str:
    return ", ".join(spec.name for spec in STACK)


def up(args: argparse.Namespace) -> int:
    settings, state_dir = mqtt_settings(args, account=False), RuntimeSettings().state_dir
    specs = [s for s in scaled(args.workers, args.emulated_workers) if _chosen(s, args.only)]
    if args.only and not specs:
        raise SystemExit(f"edgecollab: unknown service in {args.only}; known: {_names()}")
    if args.peer and not args.site:
        raise SystemExit("edgecollab: --peer needs --site (every site needs its own name)")
    credentials = Credentials.of_state_dir(state_dir)
    identities = stack_identities(specs)
    if args.site:  # what this site's replicator connects to its peers' brokers as
        identities.append(peer_account(args.site))
    if credentials.add(identities):
        print(f"up: made the stack's accounts in {credentials.root}", flush=True)
        for other in state_dir.glob("site-*"):  # other sites' brokers on this box take them
            reload_broker(other)
    credentials.ensure_tls()
    children: list[Child] = []
    if not broker_answers(settings.host, settings.port):
        if settings.host not in ("localhost", "127.0.0.1"):
            raise SystemExit(f"edgecollab: no broker answers at {settings.address}")
        state = state_dir / f"site-{args.site}" if args.site else state_dir
        print(f"up: starting mosquitto on port {settings.port} ({state})", flush=True)
        start = functools.partial(
            start_mosquitto,
            settings.port,
            state,
            security_dir=credentials.root,
            tls_port=args.tls_port or None,
            cert_port=args.cert_port or None,
            tls_bind=args.listen,
        )
        children.append(Child("mosquitto", start, broker=True))
    else:  # ours from before: it takes accounts made since
        reload_broker(state_dir / f"site-{args.site}" if args.site else state_dir)
    extra = {
        "EDGECOLLAB_MODELS_DIR": os.environ.get("EDGECOLLAB_MODELS_DIR", str(MODELS_DIR)),
        "EDGECOLLAB_STATE_DIR": str(state_dir),
    }
    if args.site:
        extra["EDGECOLLAB_REPLICATOR_SITE"] = args.site
        extra["EDGECOLLAB_REPLICATOR_PEERS"] = json.dumps(args.peer)
    gateway = _gateway_banner() if any(s.module == "services.gateway" for s in specs) else None
    broker_dir = state_dir / f"site-{args.site}" if args.site else state_dir
    child = functools.partial(
        _child, credentials=credentials, mqtt=settings, broker_dir=broker_dir, extra=extra
    )
    children += [child(spec) for spec in specs]
    print(f"up: {len(specs)} services on {settings.address}; Ctrl-C stops them", flush=True)
    if gateway:
        print(gateway, flush=True)
    say = functools.partial(print, "up:", flush=True)
    supervisor = Supervisor(children, say=say)
    models = RuntimeSettings(models_dir=extra["EDGECOLLAB_MODELS_DIR"])
    if scalable := pools(specs, models):  # the scaling loop (cms/scaling/<model>/...)
        configure_logging("up", level="warning")
        scaler = Scaler(supervisor, scalable, child, max_instances=args.max_instances, say=say)
        scaler.start(mqtt_settings(args))  # an operator account: cms/scaling/ is theirs
    signal.signal(signal.SIGTERM, lambda *_: supervisor.request_stop())
    return supervisor.run()


def _chosen(spec: ServiceSpec, only: list[str] | None) -> bool:
    """`--only worker-1` and `--only worker` (every worker) both pick workers."""
    return not only or spec.name in only or spec.name.rsplit("-", 1)[0] in only


def _gateway_banner() -> str:
    """Where the gateway listens and the default tenant's key (made now on first start)."""
    gateway = GatewaySettings(_cli_parse_args=False)
    url = gateway.url()
    lines = [f"up: HTTP API {url}/v1 (OpenAI-compatible), dashboard {url}/"]
    if gateway.key_file is not None:
        try:
            key = ensure_key_file(gateway.key_file)
        except ConfigError as exc:
            raise SystemExit(f"edgecollab: {exc}") from None
        lines.append(f"up: API key {key} (tenant default; kept in {gateway.key_file})")
    return "\n".join(lines)


def _child(
    spec: ServiceSpec,
    *,
    credentials: Credentials,
    mqtt: MqttSettings,
    broker_dir: Path,
    extra: dict[str, str],
) -> Child:
    """A service with its own account (made now for one the scaling loop adds: the broker
    reloads), its secret passed as a file."""
    if credentials.add([Identity(spec.agent, Role(spec.role))]):
        reload_broker(broker_dir)
    env = child_env(credentials.settings(spec.agent, mqtt), **extra)
    return Child(spec.name, functools.partial(_start, spec, env))


def _start(spec: ServiceSpec, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        spec.local_command(),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches `up`, which stops the children in order
    )
    relay(spec.name, proc)
    return proc
