"""`edgecollab agents`: the agents in the CMS, with status and load, and the devices that
joined by publishing readings (no card: discovered from their retained last values and from
what arrives during `--listen` seconds; state `discovered` while their newest reading is fresh
enough for a query's plan, else `silent`)."""

from __future__ import annotations

import argparse
import asyncio
import time

from services.core.bus import Bus
from services.core.cms import AgentView, CmsView
from services.data.streams import STREAMS
from services.data.view import DEVICE_FRESH_S, DataView
from tools.common import add_broker_option, connected_bus, print_json

DEVICE_HISTORY_S = 3600.0  # devices whose newest reading is older are not listed


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("agents", help="list agents from the CMS with status and load")
    parser.add_argument("--kind", help="only agents of this kind (worker, sensor, ...)")
    parser.add_argument("--json", action="store_true", help="JSON output")
    parser.add_argument(
        "--wait-for", metavar="AGENT,...", help="first wait until these agents are online"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="for --wait-for (s)")
    parser.add_argument(
        "--listen",
        type=float,
        default=0.0,
        metavar="S",
        help="also listen S seconds for devices that publish without retaining (default 0)",
    )
    add_broker_option(parser)
    parser.set_defaults(func=lambda args: asyncio.run(_agents(args)))


async def _agents(args: argparse.Namespace) -> int:
    data: list[DataView] = []

    def attach(bus: Bus) -> None:
        data.append(DataView(bus, history_s=DEVICE_HISTORY_S))

    async with connected_bus(args, mirror_cms=True, setup=attach) as (_, view):
        assert view is not None
        wanted = args.wait_for.split(",") if args.wait_for else []
        if not await view.wait_online(wanted, timeout=args.timeout):
            missing = [a for a in wanted if not view.online(a)]
            print(f"edgecollab: not online after {args.timeout:.0f} s: {', '.join(missing)}")
            return 1
        if args.listen > 0:
            await asyncio.sleep(args.listen)
        rows = [_row(a) for a in view.agents(args.kind)]
        if args.kind in (None, "sensor"):
            rows += devices(data[0], view)
    if args.json:
        print_json(rows)
    else:
        print(format_table(rows))
    return 0


def devices(data: DataView, view: CmsView) -> list[dict[str, object]]:
    """Rows for the agents that publish readings but have no card in the CMS."""
    domains: dict[str, list[str]] = {}
    for domain in sorted({d for d, _ in STREAMS}):
        for agent in data.agents(domain):
            if agent not in view.cards:
                domains.setdefault(agent, []).append(domain)
    now, rows = time.time(), []
    for agent, own in sorted(domains.items()):
        newest = max(f.ts for d in own for f in data.facts(d, agents=[agent]))
        rows.append(
            {
                "agent": agent,
                "kind": "sensor",
                "state": "discovered" if now - newest <= DEVICE_FRESH_S else "silent",
                "epoch": "-",
                "backend": "-",
                "model": "-",
                "domains": ",".join(own),
                "active": "-",
                "queued": 0,
                "tok/s": "-",
                "seen": f"{max(0.0, now - newest):.0f}s ago",
            }
        )
    return rows


def _row(agent: AgentView) -> dict[str, object]:
    card, status = agent.card, agent.status
    return {
        "agent": card.agent,
        "kind": card.kind,
        "state": "online" if agent.online else "offline",
        "epoch": card.epoch,
        "backend": card.backend or "-",
        "model": card.model.name if card.model else "-",
        "domains": (",".join(card.domains) or "-")
        + "".join(f" +check:{d}" for d in card.checks),  # what its lexicon judges
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
