"""`edgecollab agents`: the agents in the CMS, with status and load."""

from __future__ import annotations

import argparse
import asyncio
import time

from services.core.cms import AgentView
from tools.common import add_broker_option, connected_bus, print_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("agents", help="list agents from the CMS with status and load")
    parser.add_argument("--kind", help="only agents of this kind (worker, sensor, ...)")
    parser.add_argument("--json", action="store_true", help="JSON output")
    parser.add_argument(
        "--wait-for", metavar="AGENT,...", help="first wait until these agents are online"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="for --wait-for (s)")
    add_broker_option(parser)
    parser.set_defaults(func=lambda args: asyncio.run(_agents(args)))


async def _agents(args: argparse.Namespace) -> int:
    async with connected_bus(args, mirror_cms=True) as (_, view):
        assert view is not None
        wanted = args.wait_for.split(",") if args.wait_for else []
        if not await view.wait_online(wanted, timeout=args.timeout):
            missing = [a for a in wanted if not view.online(a)]
            print(f"edgecollab: not online after {args.timeout:.0f} s: {', '.join(missing)}")
            return 1
        agents = view.agents(args.kind)
    if args.json:
        print_json([_row(a) for a in agents])
    else:
        print(format_table([_row(a) for a in agents]))
    return 0


def _row(agent: AgentView) -> dict[str, object]:
    card, status = agent.card, agent.status
    return {
        "agent": card.agent,
        "kind": card.kind,
        "state": "online" if agent.online else "offline",
        "epoch": card.epoch,
        "backend": card.backend or "-",
        "model": card.model.name if card.model else "-",
        "domains": ",".join(card.domains) or "-",
        "active": f"{status.active if status else 0}/{card.concurrency or '-'}",
        "queued": status.queued if status else 0,
        "tok/s": f"{card.tokens_per_s:.0f}" if card.tokens_per_s is not None else "-",
        "seen": f"{time.time() - status.updated_at:.0f}s ago" if status else "never",
    }


def format_table(rows: list[dict[str, object]]) -> str:
    """Aligned columns with a header; '(none)' when empty."""
    if not rows:
        return "(none)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
