"""Across sites in simulated time: policies see a neighbour's extra latency, the engine's sites
and offload, and `edgecollab simulate --sites N`."""

from __future__ import annotations

import json
import random

import pytest

from services.scheduling.lengths import LengthEstimate
from services.scheduling.outcomes import Outcome
from services.scheduling.policies import Demand, EarliestFinishPolicy, Fleet, make_policy
from tools.cli.main import main
from tools.sim.engine import Sites, simulate
from tools.sim.workload import Arrival, CloudModel, NodeSpec

CLOUD = CloudModel(ttft_s=1.0, decode_tok_s=30.0)


def demand(tokens: float) -> Demand:
    return Demand(10, LengthEstimate.exactly(tokens), 512)


def test_earliest_finish_counts_a_neighbours_round_trip():
    fleet = Fleet(clock=lambda: 0.0)
    fleet.upsert("near", tokens_per_s=10, concurrency=1)
    fleet.upsert("far", tokens_per_s=20, concurrency=1, latency_s=3.0)
    policy, rng = EarliestFinishPolicy(), random.Random(0)
    assert policy.choose(demand(50), fleet, rng).agent == "near"  # 5 s here, 2.5 + 3 s there
    assert policy.choose(demand(200), fleet, rng).agent == "far"  # 20 s here, 10 + 3 s there
    fleet.started("near", 100)
    fleet.started("far", 100)
    waits = policy.choose(demand(50), fleet, rng)  # both full: 10 + 5 s here, 5 + 2.5 + 3 there
    assert waits.agent == "far" and waits.max_wait_s == pytest.approx(20 + 1.5 - 2.5 - 3)
    far = Fleet(clock=lambda: 0.0)
    far.upsert("far", tokens_per_s=20, concurrency=1, latency_s=30.0)
    far.started("far", 100)
    assert policy.choose(demand(50), far, rng).agent is None  # past the deadline: the cloud
    with pytest.raises(ValueError, match="latency_s"):
        far.upsert("x", tokens_per_s=1, concurrency=1, latency_s=float("nan"))


def two_sites(offload: bool) -> tuple[list[Arrival], list[NodeSpec], Sites]:
    nodes = [NodeSpec(id=f"n{k}", tokens_per_s=10, concurrency=1) for k in range(2)]
    requests = [Arrival(0.0, 10, 50, site=0), Arrival(0.0, 10, 50, site=0)]
    return requests, nodes, Sites([0, 1], rtt_s=0.5, offload=offload)


def test_a_full_site_uses_a_free_slot_at_its_neighbour_and_pays_the_round_trip():
    requests, nodes, sites = two_sites(offload=True)
    result = simulate(requests, nodes, make_policy("load_aware"), cloud=CLOUD, sites=sites)
    assert result.outcomes == [Outcome.EDGE, Outcome.EDGE] and result.offloaded == 1
    assert sorted(result.latencies_s) == pytest.approx([5.0, 5.5])  # type: ignore[type-var]
    assert result.tally.cloud_cost_usd == 0 and result.sites[1].requests == 0

    requests, nodes, alone = two_sites(offload=False)
    result = simulate(requests, nodes, make_policy("load_aware"), cloud=CLOUD, sites=alone)
    assert result.outcomes == [Outcome.EDGE, Outcome.REJECTED_TO_CLOUD]
    assert result.offloaded == 0 and result.sites[0].cloud_cost_usd > 0


def test_simulate_sites_reports_both_arms_and_each_site_alone_is_the_plain_run(capsys):
    common = ["simulate", "--horizon", "900", "--policy", "earliest_finish", "--json"]
    assert main([*common, "--sites", "2", "--site-rtt-ms", "40"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["sites"], report["rtt_ms"], report["nodes_per_site"]) == (2, 40, 8)
    run = report["policies"]["earliest_finish"]
    alone, offload = run["alone"], run["offload"]
    assert alone["offloaded"] == 0 and offload["offloaded"] > 0
    for a, o in zip(alone["per_site"], offload["per_site"], strict=True):
        assert a["requests"] == o["requests"] > 0
    ratios = run["offload_over_alone"]
    assert len(ratios["cloud_cost"]) == len(ratios["p95"]) == 2
    assert isinstance(ratios["target_met"], bool)

    assert main(common) == 0  # site 1 alone is the one-site experiment, same seed
    plain = json.loads(capsys.readouterr().out)["policies"]["earliest_finish"]
    first = alone["per_site"][0]
    for column in ("requests", "cloud", "cloud_cost_usd", "latency_p95_s"):
        assert first[column] == plain[column], column


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--sites", "0"], "--sites must be 1 to 64, got 0"),
        (["--sites", "1000000000"], "--sites must be 1 to 64"),
        (["--sites", "2", "--site-rtt-ms", "inf"], "--site-rtt-ms must be a number"),
        (["--sites", "2", "--site-rtt-ms", "nan"], "--site-rtt-ms must be a number"),
        (["--sites", "2", "--trace", "x.jsonl"], "not with --trace"),
    ],
)
def test_simulate_sites_refuses_bad_input_in_one_line(args, says, capsys):
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
