"""`edgecollab cms ls|get|put|rm|watch`: the Capability Metadata Store, like etcdctl."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys

import orjson

from services.core import cms as cms_ops
from services.core import configs
from services.core.cms import cms_key
from services.core.settings import MqttSettings
from services.core.topics import CMS_KEY, CMS_ROOT, BadTopic
from tools.common import add_broker_option, connected_bus, print_json


def checked_key(key: str, *, prefix: bool = False) -> str:
    """`key` as a full CMS key (cms/...), or exit with one line saying what is wrong with it.

    A prefix (ls, get, watch) may be empty or end in '/'; a key must name an entry.
    """
    shown = key if len(key) <= 60 else f"{key[:40]}... ({len(key):,} characters)"
    if prefix and key.strip("/") in ("", CMS_ROOT):
        return CMS_ROOT
    if not key.strip("/"):
        raise SystemExit("edgecollab: empty CMS key")
    if "+" in key or "#" in key:
        raise SystemExit(f"edgecollab: bad CMS key {shown!r}: MQTT wildcards (+, #) are not keys")
    name = cms_key(key.removesuffix("/") if prefix else key)
    try:
        CMS_KEY.at(name)
    except BadTopic as exc:
        if name == CMS_ROOT:
            hint = "name a key under cms/, e.g. configs/m/max_tokens"
            raise SystemExit(f"edgecollab: {hint}") from None
        reason = str(exc)
        if "is not a topic level" in reason:
            reason = "a key's levels must be non-empty (no '//'), not '..', without NUL"
        elif len(reason) > 120:
            reason = "not a CMS key"
        raise SystemExit(f"edgecollab: bad CMS key {shown!r}: {reason}") from None
    return name


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("cms", help="read and write the Capability Metadata Store")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, help_text in (
        ("ls", "list keys under a prefix"),
        ("get", "print entries under a key or prefix"),
        ("watch", "print changes under a prefix until Ctrl-C"),
    ):
        verb = verbs.add_parser(name, help=help_text)
        verb.add_argument("prefix", nargs="?", default="", help="e.g. agents/ or cms/slm/")
        verb.add_argument("--json", action="store_true", help="JSON output")
        add_broker_option(verb)
        verb.set_defaults(func=lambda args, n=name: asyncio.run(_VERBS[n](args)))
    put = verbs.add_parser("put", help="write a value (JSON, else a string)")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--expiry", type=float, metavar="S", help="MQTT 5 message expiry in seconds")
    add_broker_option(put)
    put.set_defaults(func=lambda args: asyncio.run(_put(args)))
    rm = verbs.add_parser("rm", help="delete a key (empty retained payload)")
    rm.add_argument("key")
    add_broker_option(rm)
    rm.set_defaults(func=lambda args: asyncio.run(_rm(args)))


async def _ls(args: argparse.Namespace) -> int:
    checked_key(args.prefix, prefix=True)
    async with connected_bus(args, mirror_cms=True) as (_, view):
        pass
    keys = [key for key, _ in view.items(args.prefix)]
    if args.json:
        print_json(keys)
    else:
        print("\n".join(keys))
    return 0


async def _get(args: argparse.Namespace) -> int:
    checked_key(args.prefix, prefix=True)
    async with connected_bus(args, mirror_cms=True) as (_, view):
        pass
    entries = {key: entry.model_dump(mode="json") for key, entry in view.items(args.prefix)}
    if not entries:
        print(f"edgecollab: no key under {cms_key(args.prefix)}")
        return 1
    if args.json:
        print_json(entries)
    else:
        for key, entry in entries.items():
            print(
                f"{key} = {orjson.dumps(entry['value']).decode()}  "
                f"(v{entry['version']} by {entry['origin']} at {_time(entry['updated_at'])})"
            )
    return 0


async def _watch(args: argparse.Namespace) -> int:
    prefix = checked_key(args.prefix, prefix=True)

    def show(key: str, entry) -> None:  # type: ignore[no-untyped-def]
        if not key.startswith(prefix):
            return
        value = None if entry is None else entry.model_dump(mode="json")
        if args.json:
            print(orjson.dumps({"key": key, "entry": value}).decode(), flush=True)
        else:
            text = "<deleted>" if value is None else orjson.dumps(value["value"]).decode()
            print(f"{key} = {text}", flush=True)

    async with connected_bus(args, mirror_cms=True) as (_, view):
        for key, entry in view.items(args.prefix):
            show(key, entry)
        view.on_change(show)
        await asyncio.Event().wait()
    return 0


async def _put(args: argparse.Namespace) -> int:
    checked_key(args.key)
    if args.expiry is not None and not args.expiry > 0:
        raise SystemExit("edgecollab: --expiry must be a positive number of seconds")
    try:
        value = orjson.loads(args.value)
    except orjson.JSONDecodeError:
        value = args.value
    key = cms_key(args.key)
    if key.startswith("cms/configs/") and (problem := configs.problem(key, value)):
        raise SystemExit(f"edgecollab: {key}: {problem}")
    limit = MqttSettings().max_payload
    if len(args.value.encode()) > limit - 512:  # the entry's envelope takes the rest
        raise SystemExit(f"edgecollab: the value has {len(args.value):,} bytes; at most ~{limit:,}")
    async with connected_bus(args, mirror_cms=True) as (bus, view):
        current = view.get(args.key)
        version = current.version + 1 if current else 1
        await cms_ops.put(bus, args.key, value, version=version, expiry_s=args.expiry)
        await bus.barrier()  # our own entry comes back before this, if the broker took it
        taken = view.get(args.key)
    if taken is None or (taken.version, taken.origin) != (version, bus.client_id):
        return _refused(args.key, bus.client_id)
    print(f"{cms_key(args.key)} = {orjson.dumps(value).decode()} (v{version})")
    return 0


async def _rm(args: argparse.Namespace) -> int:
    checked_key(args.key)
    async with connected_bus(args, mirror_cms=True) as (bus, view):
        await cms_ops.delete(bus, args.key)
        await bus.barrier()
        kept = view.get(args.key)
    if kept is not None:
        return _refused(args.key, bus.client_id)
    print(f"{cms_key(args.key)} deleted")
    return 0


def _refused(key: str, account: str) -> int:
    print(
        f"edgecollab: {cms_key(key)} was not written: the broker refused it for account"
        f" {account!r}, or the CMS ignores it from that origin (README Security)",
        file=sys.stderr,
    )
    return 1


def _time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).isoformat(timespec="seconds")


_VERBS = {"ls": _ls, "get": _get, "watch": _watch}
