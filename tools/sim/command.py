"""`edgecollab simulate`: the paper's scheduling experiment (Fig. 6) in simulated time."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import orjson

from services.core import cms
from services.core.topics import EXPERIMENT
from services.scheduling.policies import POLICIES
from tools.common import add_broker_option, connected_bus
from tools.sim.engine import KNOWLEDGE, Knowledge
from tools.sim.experiment import Experiment, run_experiment
from tools.sim.report import PlotUnavailable, fig6, plot, table
from tools.sim.sites import check, run_sites, site_nodes, site_workload
from tools.sim.sites import table as sites_table
from tools.sim.workload import (
    DEFAULT_SCENARIO,
    MAX_TOKENS_LIMIT,
    Arrival,
    InputFileError,
    LabelSpec,
    NodeSpec,
    Scenario,
    generate_workload,
    load_nodes,
    load_scenario,
    load_trace,
    write_nodes,
    write_trace,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="replay the paper's scheduling experiment in simulated time",
        description="Discrete-event simulation of a fleet under bursty load, per policy.",
    )
    p.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO, help="experiment file")
    p.add_argument(
        "--nodes", type=Path, help="node file: JSON list of {id, tokens_per_s, concurrency}"
    )
    p.add_argument("--fleet", type=_mix, help="node types and counts, e.g. agx_orin=1,orin_nano=7")
    p.add_argument(
        "--trace",
        type=Path,
        help="trace file: JSON Lines of {t, prompt_tokens, output_tokens[, max_tokens, domain, "
        "difficulty]}",
    )
    p.add_argument(
        "--knowledge",
        action="append",
        help="what a policy knows of output lengths, repeatable or 'all': predicted (default: "
        "learned online), max_tokens (the cap only), oracle (the true length, for comparison)",
    )
    p.add_argument(
        "--clairvoyant", action="store_true", help="the oracle: same as --knowledge oracle"
    )
    p.add_argument("--load-scale", type=_positive, default=1.0, help="multiply arrival rates")
    p.add_argument(
        "--label-fidelity",
        type=float,
        help="generated load: how often a request's domain/difficulty fit its length (0-1)",
    )
    p.add_argument(
        "--length-sigma",
        type=float,
        help="generated load: log-normal jitter of each output length (0: the five sizes)",
    )
    p.add_argument("--max-tokens", type=int, help="generated load: every request's max_tokens")
    p.add_argument(
        "--horizon", type=_positive, help="seconds of generated load (default: scenario)"
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--policy", action="append", help=f"repeatable, or 'all': {', '.join(POLICIES)}")
    p.add_argument("--no-cloud", action="store_true", help="no cloud: over-capacity is rejected")
    p.add_argument(
        "--sites",
        type=int,
        help="N sites, each with the fleet and its own load, surges out of phase; every policy "
        "runs with each site alone and with neighbour offload",
    )
    p.add_argument(
        "--site-rtt-ms", type=float, default=50.0, help="--sites: round trip between sites (ms)"
    )
    p.add_argument("--bound-latency", type=_positive, help="Δ for the lower bound (default: auto)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="draw Fig. 6 (needs matplotlib)")
    p.add_argument(
        "--publish",
        action="store_true",
        help="also put Fig. 6's numbers in the CMS (cms/experiments/fig6) for the dashboard",
    )
    add_broker_option(p)
    p.add_argument("--write-trace", type=Path, metavar="FILE", help="write the workload and exit")
    p.add_argument("--write-nodes", type=Path, metavar="FILE", help="write the fleet and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        policies = _policies(args.policy)
        knowledge = _knowledge(args.knowledge, clairvoyant=args.clairvoyant)
        scenario = _adjusted(load_scenario(args.scenario), args)
        nodes = load_nodes(args.nodes) if args.nodes else scenario.nodes(args.fleet)
        seeds = range(args.seed, args.seed + max(args.seeds, 1))
        if args.sites is not None:
            return _run_sites(args, scenario, nodes, seeds, policies, knowledge)
        workloads = {seed: _workload(args, scenario, seed) for seed in seeds}
    except (InputFileError, ValueError) as e:
        print(f"edgecollab simulate: error: {e}", file=sys.stderr)
        return 2
    if args.write_trace or args.write_nodes:
        return _write_examples(args, nodes, workloads[args.seed])
    cloud = None if args.no_cloud else scenario.cloud
    exp = Experiment(nodes, workloads, policies, cloud, args.bound_latency, knowledge)
    report = run_experiment(exp)
    print(
        orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
        if args.json
        else table(report)
    )
    if args.plot:
        try:
            plot(report, args.plot)
        except PlotUnavailable as e:
            print(f"edgecollab simulate: {e}", file=sys.stderr)
            return 1
    if args.publish:
        asyncio.run(_publish(args, fig6(report)))
    return 0


def _run_sites(
    args: argparse.Namespace,
    scenario: Scenario,
    nodes: list[NodeSpec],
    seeds: range,
    policies: list[str],
    knowledge: list[Knowledge],
) -> int:
    """`--sites N`: the report of `tools/sim/sites.py`; ValueError for what it cannot do."""
    check(args.sites, args.site_rtt_ms)
    unsupported = [
        flag
        for flag, value in (
            ("--trace", args.trace),
            ("--plot", args.plot),
            ("--write-trace", args.write_trace),
            ("--write-nodes", args.write_nodes),
            ("--bound-latency", args.bound_latency),
        )
        if value
    ]
    if unsupported:
        raise ValueError(f"--sites generates each site's load; not with {', '.join(unsupported)}")
    horizon = args.horizon or scenario.horizon_s
    workloads = {
        seed: site_workload(
            scenario.workload,
            sites=args.sites,
            horizon_s=horizon,
            seed=seed,
            load_scale=args.load_scale,
        )
        for seed in seeds
    }
    all_nodes, of_node = site_nodes(nodes, args.sites)
    cloud = None if args.no_cloud else scenario.cloud
    exp = Experiment(all_nodes, workloads, policies, cloud, None, knowledge)
    report = run_sites(exp, of_node, args.site_rtt_ms)
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if args.json else None
    print(text or sites_table(report))
    return 0


async def _publish(args: argparse.Namespace, figure: dict[str, object]) -> None:
    async with connected_bus(args) as (bus, _):
        key = EXPERIMENT.format(name="fig6")
        await cms.put(bus, key, figure, version=time.time_ns() // 1000)
    print(f"edgecollab simulate: published {key}", file=sys.stderr)


def _workload(args: argparse.Namespace, scenario: Scenario, seed: int) -> list[Arrival]:
    if args.trace:
        return load_trace(args.trace)
    horizon = args.horizon or scenario.horizon_s
    return generate_workload(
        scenario.workload, horizon_s=horizon, seed=seed, load_scale=args.load_scale
    )


def _write_examples(args: argparse.Namespace, nodes: list[NodeSpec], trace: list[Arrival]) -> int:
    if args.write_nodes:
        write_nodes(args.write_nodes, nodes)
        print(f"wrote {len(nodes)} nodes to {args.write_nodes}", file=sys.stderr)
    if args.write_trace:
        write_trace(args.write_trace, trace)
        print(f"wrote {len(trace)} requests to {args.write_trace}", file=sys.stderr)
    return 0


def _adjusted(scenario: Scenario, args: argparse.Namespace) -> Scenario:
    """The scenario with the workload options of the command line."""
    update: dict[str, object] = {}
    if args.label_fidelity is not None:
        if not 0 <= args.label_fidelity <= 1:
            raise ValueError(f"--label-fidelity must be in [0, 1], got {args.label_fidelity}")
        update["labels"] = LabelSpec(fidelity=args.label_fidelity)
    if args.length_sigma is not None:
        if not 0 <= args.length_sigma <= 3:
            raise ValueError(f"--length-sigma must be in [0, 3], got {args.length_sigma}")
        update["length_sigma"] = args.length_sigma
    if args.max_tokens is not None:
        if not 1 <= args.max_tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(f"--max-tokens must be in [1, {MAX_TOKENS_LIMIT}]")
        update["max_tokens"] = args.max_tokens
    if not update:
        return scenario
    return scenario.model_copy(update={"workload": scenario.workload.model_copy(update=update)})


def _knowledge(names: list[str] | None, *, clairvoyant: bool) -> list[Knowledge]:
    if clairvoyant:
        if names and set(names) != {"oracle"}:
            raise ValueError("--clairvoyant is --knowledge oracle; give one of them")
        return ["oracle"]
    if not names:
        return ["predicted"]
    if "all" in names:
        return list(KNOWLEDGE)
    unknown = [n for n in names if n not in KNOWLEDGE]
    if unknown:
        raise ValueError(f"unknown knowledge {unknown[0]!r}; valid: {', '.join(KNOWLEDGE)}, all")
    return list(dict.fromkeys(names))  # type: ignore[arg-type]


def _policies(names: list[str] | None) -> list[str]:
    if not names or "all" in names:
        return list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; valid: {', '.join(POLICIES)}, all")
    return list(dict.fromkeys(names))


def _mix(value: str) -> dict[str, int]:
    try:
        pairs = (item.split("=") for item in value.split(","))
        return {kind.strip(): int(count) for kind, count in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"want TYPE=N,TYPE=N, got {value!r}") from None


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number
