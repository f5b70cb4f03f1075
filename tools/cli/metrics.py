"""`edgecollab metrics`: outcomes, cloud spend and latency per orchestrator, from the CMS."""

from __future__ import annotations

import argparse
import asyncio

from services.core.topics import METRIC
from tools.cli.agents import format_table
from tools.common import add_broker_option, connected_bus, print_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("metrics", help="requests, outcomes and cloud cost per orchestrator")
    parser.add_argument("--json", action="store_true", help="JSON output")
    add_broker_option(parser)
    parser.set_defaults(func=lambda args: asyncio.run(_metrics(args)))


async def _metrics(args: argparse.Namespace) -> int:
    async with connected_bus(args, mirror_cms=True) as (_, view):
        assert view is not None
        found = {
            params["scope"]: entry.value
            for key, entry in view.items("metrics/")
            if (params := METRIC.match(key)) and params["name"] == "requests"
        }
    if args.json:
        print_json(found)
        return 0
    rows = [
        {
            "orchestrator": scope,
            "policy": m.get("policy", "-"),
            "requests": m["requests"],
            "edge": m["processed_edge"],
            "rejected": m["rejected_edge"],
            "cloud": m["cloud"],
            "failed": m["failed"],
            "cloud usd": f"{m['cloud_cost_usd']:.4f}",
            "mean s": _seconds(m.get("latency_mean_s")),
            "p95 s": _seconds(m.get("latency_p95_s")),
        }
        for scope, m in sorted(found.items())
    ]
    print(format_table(rows))
    return 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
