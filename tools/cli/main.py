"""The `edgecollab` command: one sub-command per operator task.

Each command lives in its own module under `tools/` and exposes `register(subparsers)`, which adds
its parser and sets `func` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pydantic import ValidationError

from services.core.errors import EdgecollabError
from services.core.topics import BadTopic

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
    "tools.cli.kb",
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
    """Run one command; whatever goes wrong ends in one line on stderr and a non-zero status
    (EDGECOLLAB_DEBUG=1 shows the traceback of an unexpected error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgecollab cms ls | head -1`: the reader left; so do we, quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a shell reports a process killed by SIGPIPE
    except (EdgecollabError, BadTopic, ValidationError, OSError, ValueError) as exc:
        return fail(exc)
    except Exception as exc:
        if os.environ.get("EDGECOLLAB_DEBUG"):
            raise
        return fail(exc, hint=" (EDGECOLLAB_DEBUG=1 shows the traceback)")


def fail(exc: BaseException, *, hint: str = "") -> int:
    """One line on stderr: what went wrong, never a traceback."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = f"{where}: {first['msg']}" if where else first["msg"]
    else:
        message = str(exc) or type(exc).__name__
    line = " ".join(message.split())[:300]
    print(f"edgecollab: {line}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
