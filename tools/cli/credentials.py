"""`edgecollab credentials init|add|ls|acl`: the broker's accounts, ACL and TLS certificates.

Everything lives in $EDGECOLLAB_STATE_DIR/security (`--state-dir` for another folder); no
command prints a secret, only where its file is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.core.settings import RuntimeSettings
from tools.common import print_json
from tools.common.broker import reload_broker
from tools.common.credentials import Credentials, stack_identities
from tools.common.security import Identity, Role, acl, peer_account


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("credentials", help="accounts, ACL and TLS certificates of the broker")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    init = verbs.add_parser("init", help="make the stack's accounts, ACL and certificates")
    init.add_argument(
        "--tls-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address for the broker's certificate (repeatable)",
    )
    init.add_argument(
        "--site", help="this site's name: also its replicator's account on peers, peer-<site>"
    )
    init.add_argument(
        "--chown",
        metavar="BROKER_UID:SERVICES_UID",
        help="compose: give the broker's files and the secrets to these users",
    )
    add = verbs.add_parser("add", help="add an account (a device, a client, an operator...)")
    add.add_argument("name", help="the username and client id, e.g. watch-7")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add.add_argument("--rotate", action="store_true", help="a new secret if it exists")
    add.add_argument(
        "--secret-file",
        type=Path,
        metavar="FILE",
        help="take this secret (another site's peer-<site> account: the file that site made)",
    )
    show = verbs.add_parser("ls", help="accounts and roles (no secrets)")
    show.add_argument("--json", action="store_true")
    verbs.add_parser("acl", help="print the ACL the accounts' roles make")
    for verb in (init, add, show, *verbs.choices.values()):
        if not any(a.dest == "state_dir" for a in verb._actions):
            verb.add_argument("--state-dir", type=Path, help="default: $EDGECOLLAB_STATE_DIR")
    init.set_defaults(func=_init)
    add.set_defaults(func=_add)
    show.set_defaults(func=_ls)
    verbs.choices["acl"].set_defaults(func=_acl)


def _store(args: argparse.Namespace) -> tuple[Credentials, Path]:
    state_dir = args.state_dir or RuntimeSettings().state_dir
    return Credentials.of_state_dir(state_dir), state_dir


def _init(args: argparse.Namespace) -> int:
    credentials, state_dir = _store(args)
    identities = stack_identities()
    if args.site:
        identities.append(peer_account(args.site))
    try:
        made = credentials.add(identities)
    except ValueError as exc:
        raise SystemExit(f"edgecollab: {exc}") from None
    credentials.ensure_tls(args.tls_name)
    if args.chown:
        broker, services = (int(uid) for uid in args.chown.split(":"))
        credentials.chown(broker=broker, services=services)
    if made and reload_broker(state_dir):
        print("credentials: the running broker reloaded its accounts")
    print(f"credentials: {len(made)} new account(s) in {credentials.root}")
    return 0


def _add(args: argparse.Namespace) -> int:
    credentials, state_dir = _store(args)
    try:
        identity = Identity(args.name, Role(args.role))
        given = {}
        if args.secret_file is not None:
            given[identity.name] = args.secret_file.read_text().strip()
            if not given[identity.name]:
                raise ValueError(f"{args.secret_file} is empty")
        made = credentials.add([identity], rotate=args.rotate, secrets=given)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"edgecollab: {exc}") from None
    reloaded = reload_broker(state_dir)
    state = "new secret" if made else "exists"
    print(f"{identity.name} ({identity.role}): {state}, {credentials.secret_file(identity.name)}")
    if made and not reloaded:
        print("credentials: reload the broker to take it (SIGHUP; compose: kill -s HUP mosquitto)")
    return 0


def _ls(args: argparse.Namespace) -> int:
    credentials, _ = _store(args)
    accounts = {name: role.value for name, role in credentials.accounts().items()}
    if args.json:
        print_json(accounts)
    else:
        print("\n".join(f"{name}  {role}" for name, role in accounts.items()))
    return 0


def _acl(args: argparse.Namespace) -> int:
    credentials, _ = _store(args)
    print(acl(Identity(n, r) for n, r in credentials.accounts().items()), end="")
    return 0
