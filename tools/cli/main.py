"""The `edgecollab` command: one sub-command per operator task.

Each command lives in its own module under `tools/` and exposes `register(subparsers)`, which adds
its parser and sets `func` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register a top-level sub-command, in the order `--help` lists them.
COMMAND_MODULES = (
    "tools.cli.up",
    "tools.cli.ask",
    "tools.cli.demo",
    "tools.cli.agents",
    "tools.cli.metrics",
    "tools.cli.cms",
    "tools.cli.credentials",
    "tools.cli.contract",
    "tools.cli.classify",
    "tools.sim.command",
    "tools.bench",
    "tools.export.model",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecollab",
        description="Collaborative generative AI on edge boxes over MQTT.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
