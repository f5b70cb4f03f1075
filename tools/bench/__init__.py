"""`edgecollab bench ...`: benchmarks that print JSON. Each module registers one sub-command."""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = (
    "tools.bench.bus",
    "tools.bench.policy",
    "tools.bench.classify",
    "tools.bench.worker",
    "tools.bench.data",
    "tools.bench.fig6",
    "tools.bench.faults",
    "tools.bench.grounding",
    "tools.bench.quality",
    "tools.bench.sampling",
    "tools.bench.gap",
    "tools.bench.replicate",
    "tools.bench.kb",
    "tools.bench.security",
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="measure the stack; prints JSON")
    bench_sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench_sub)
