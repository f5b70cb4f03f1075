"""`edgecollab schemas export`: JSON Schemas of every message, for devices in other languages."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import orjson

from schemas import ALL_MESSAGES
from tools import ROOT

SCHEMA_DIR = ROOT / "schemas" / "json"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("schemas", help="the message contract as JSON Schema")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    export = verbs.add_parser("export", help="write schemas/json/*.json")
    export.add_argument("--out", type=Path, default=SCHEMA_DIR)
    export.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    export.set_defaults(func=_export)


def rendered() -> dict[str, bytes]:
    """File name → JSON Schema bytes for every message model."""
    files = {}
    for model in ALL_MESSAGES:
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", model.__name__).lower()
        schema = model.model_json_schema()
        schema["$id"] = f"https://edgecollab.dev/schemas/v1/{name}.json"
        files[f"{name}.json"] = orjson.dumps(schema, option=orjson.OPT_INDENT_2) + b"\n"
    return files


def _export(args: argparse.Namespace) -> int:
    files = rendered()
    if args.check:
        stale = [n for n, data in files.items() if _read(args.out / n) != data]
        for name in stale:
            print(f"stale: {args.out / name} (run: edgecollab schemas export)")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    print(f"wrote {len(files)} schemas to {args.out}")
    return 0


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None
