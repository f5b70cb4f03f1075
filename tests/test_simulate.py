"""The discrete-event simulator, the workload and file formats, the bound and the CLI."""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from services.scheduling.lengths import LengthEstimate
from services.scheduling.outcomes import CLOUD_SERVED, Outcome
from services.scheduling.policies import Decision, Demand, EarliestFinishPolicy, Fleet, make_policy
from tools.cli.main import main
from tools.sim.bound import edf_lost_work, lower_bound_cost
from tools.sim.engine import simulate
from tools.sim.workload import (
    Arrival,
    CloudModel,
    InputFileError,
    NodeSpec,
    consistent_pairs,
    generate_workload,
    load_nodes,
    load_scenario,
    load_trace,
    write_nodes,
    write_trace,
)

CLOUD = CloudModel(ttft_s=1.0, decode_tok_s=30.0)
A = '{"id": "a", "tokens_per_s": 10, "concurrency": 2}'


def node(rate: float = 10.0, limit: int = 2, beta: float = 0.5, id: str = "n1") -> NodeSpec:
    return NodeSpec(id=id, tokens_per_s=rate, concurrency=limit, batching_beta=beta)


@dataclass(frozen=True)
class Always:
    """Sends every request to one agent, waiting there up to `wait` seconds."""

    agent: str
    wait: float = 0.0
    name: ClassVar[str] = "always"

    def choose(self, demand: object, fleet: object, rng: object) -> Decision:
        return Decision(self.agent, self.wait)


def test_processor_sharing_by_hand() -> None:
    # k=2 streams share 10 * 2**0.5 tok/s: 7.07 tok/s each; the 50-token one ends at 50/7.07 s,
    # then the other decodes its last 50 tokens alone at 10 tok/s.
    requests = [Arrival(0.0, 10, 100), Arrival(0.0, 10, 50)]
    result = simulate(requests, [node()], make_policy("load_aware"), cloud=CLOUD)
    short = 50 / (10 * 2**-0.5)
    assert result.latencies_s == pytest.approx([short + 5.0, short])
    assert result.outcomes == [Outcome.EDGE, Outcome.EDGE]
    assert result.utilization == pytest.approx([(2 * short + 5.0) / (2 * (short + 5.0))])


def test_full_node_rejects_to_cloud_at_the_cloud_price() -> None:
    requests = [Arrival(0.0, 10, 100), Arrival(1.0, 1000, 50)]
    result = simulate(requests, [node(limit=1)], make_policy("load_aware"), cloud=CLOUD)
    assert result.outcomes == [Outcome.EDGE, Outcome.REJECTED_TO_CLOUD]
    assert result.latencies_s == pytest.approx([10.0, 1.0 + 50 / 30])
    assert result.tally.cloud_cost_usd == pytest.approx(1000 * 30e-6 + 50 * 60e-6)
    summary = result.tally.summary()
    assert (summary["rejected_edge"], summary["cloud"], summary["processed_edge"]) == (1, 1, 1)


def test_waiting_for_a_slot_keeps_the_request_at_the_edge() -> None:
    requests = [Arrival(0.0, 10, 100), Arrival(1.0, 10, 50)]
    policy = EarliestFinishPolicy()
    result = simulate(requests, [node(limit=1)], policy, cloud=CLOUD, knowledge="oracle")
    assert result.outcomes == [Outcome.EDGE, Outcome.EDGE]
    assert result.latencies_s == pytest.approx([10.0, 14.0])  # waits 9 s, then 5 s alone
    assert result.tally.cloud_cost_usd == 0


def test_an_expired_wait_is_a_rejection_served_by_the_cloud() -> None:
    requests = [Arrival(0.0, 10, 100), Arrival(1.0, 10, 30)]
    result = simulate(requests, [node(limit=1)], Always("n1", wait=2.0), cloud=CLOUD)
    assert result.outcomes == [Outcome.EDGE, Outcome.REJECTED_TO_CLOUD]
    assert result.latencies_s[1] == pytest.approx(2.0 + 1.0 + 30 / 30)


def test_without_a_cloud_over_capacity_is_rejected() -> None:
    requests = [Arrival(0.0, 10, 100), Arrival(1.0, 10, 50)]
    result = simulate(requests, [node(limit=1)], make_policy("random"), cloud=None)
    assert result.outcomes == [Outcome.EDGE, Outcome.REJECTED]
    summary = result.tally.summary()
    assert (summary["rejected_edge"], summary["cloud"], summary["cloud_cost_usd"]) == (1, 0, 0)
    assert result.latencies_s[1] is None


@pytest.fixture(scope="module")
def short_runs() -> dict[str, tuple[list[Arrival], object]]:
    """Each policy over 20 simulated minutes (two surges) of the default experiment."""
    scenario = load_scenario()
    requests = generate_workload(scenario.workload, horizon_s=1200, seed=3)
    return {
        name: (requests, simulate(requests, scenario.nodes(), make_policy(name), cloud=CLOUD))
        for name in ("random", "weighted", "load_aware", "earliest_finish")
    }


def test_conservation_laws(short_runs: dict) -> None:
    nodes = load_scenario().nodes()
    fastest = max(n.tokens_per_s for n in nodes)
    for requests, result in short_runs.values():
        s = result.tally.summary()
        outcomes = s["outcomes"]
        assert s["requests"] == len(requests) == sum(outcomes.values())
        assert s["processed_edge"] + s["cloud"] + outcomes["rejected"] + s["failed"] == len(
            requests
        )
        expected_cost = sum(
            CLOUD.prices.cost(r.prompt_tokens, r.output_tokens)
            for r, o in zip(requests, result.outcomes, strict=True)
            if o in CLOUD_SERVED
        )
        assert result.tally.cloud_cost_usd == pytest.approx(expected_cost)
        assert all(0 <= u <= 1 for u in result.utilization)
        for r, o, latency in zip(requests, result.outcomes, result.latencies_s, strict=True):
            floor = (
                r.output_tokens / fastest if o is Outcome.EDGE else CLOUD.latency_s(r.output_tokens)
            )
            assert latency >= floor - 1e-9


def test_paper_ordering_and_our_policy_on_a_short_horizon(short_runs: dict) -> None:
    cost = {n: r.tally.cloud_cost_usd for n, (_, r) in short_runs.items()}
    rejected = {n: r.tally.summary()["rejected_edge"] for n, (_, r) in short_runs.items()}
    assert cost["load_aware"] <= 0.6 * cost["random"]
    assert rejected["load_aware"] < min(rejected["random"], rejected["weighted"])
    assert cost["earliest_finish"] <= 0.6 * cost["load_aware"]


def test_lower_bound_by_hand_and_below_every_policy(short_runs: dict) -> None:
    # one 10 tok/s fluid server, two 100-token requests due within 10 s: 100 tokens are lost;
    # the bound drops the cheaper one (no prompt): 100 * $60/1M.
    cheap, dear = Arrival(0.0, 0, 100), Arrival(0.0, 1000, 100)
    bound = lower_bound_cost(
        [cheap, dear], [node(rate=10, beta=0.0)], CLOUD.prices, max_latency_s=10.0
    )
    assert bound == pytest.approx(100 * 60e-6)
    requests = next(iter(short_runs.values()))[0]
    nodes = load_scenario().nodes()
    for _, result in short_runs.values():
        limit = max(result.max_edge_latency_s, 1.0)
        assert lower_bound_cost(requests, nodes, CLOUD.prices, max_latency_s=limit) <= (
            result.tally.cloud_cost_usd + 1e-9
        )


def test_edf_loses_least() -> None:
    # a tight job and a loose one at t=0 on a 1 tok/s server: EDF fits both (lost 0)
    import numpy as np

    lost = edf_lost_work(np.array([0.0, 0.0]), np.array([10.0, 2.0]), np.array([5.0, 2.0]), 1.0)
    assert lost == 0.0
    lost = edf_lost_work(np.array([0.0, 0.0]), np.array([3.0, 2.0]), np.array([2.0, 2.0]), 1.0)
    assert lost == pytest.approx(1.0)


def test_workload_is_bursty_reproducible_and_sorted() -> None:
    spec = load_scenario().workload
    a = generate_workload(spec, horizon_s=1200, seed=7)
    assert a == generate_workload(spec, horizon_s=1200, seed=7)
    assert a != generate_workload(spec, horizon_s=1200, seed=8)
    times = [r.t for r in a]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 1200
    assert {r.output_tokens for r in a} <= {50, 100, 200, 300, 500}
    surge = sum(1 for t in times if 240 <= t < 360) / 120
    calm = sum(1 for t in times if 0 <= t < 240) / 240
    assert 2.0 < surge / calm < 4.5  # 6 vs 2 requests/s
    assert len(generate_workload(spec, horizon_s=1200, seed=7, load_scale=2.0)) > 1.7 * len(a)


def test_node_and_trace_files_round_trip(tmp_path: Path) -> None:
    nodes = load_scenario().nodes({"agx_orin": 1, "orin_nano": 2})
    write_nodes(tmp_path / "nodes.json", nodes)
    assert load_nodes(tmp_path / "nodes.json") == nodes
    requests = [Arrival(0.5, 10, 50), Arrival(1.25, 20, 100)]
    write_trace(tmp_path / "trace.jsonl", requests)
    assert load_trace(tmp_path / "trace.jsonl") == requests


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f'[\n {A},\n {{"id": "b", "concurrency": 2}}\n]',
         "line 3: field 'tokens_per_s': Field required"),
        (f'[{A},\n\n {{"id": "b", "tokens_per_s": -1, "concurrency": 1}}]',
         "line 3: field 'tokens_per_s': Input should be greater than 0"),
        (f"[{A},\n {A}]", "line 2: field 'id': duplicate id 'a'"),
        ('[{"id": "a", "tokens_per_s": 10, "concurrency": 0}]', "line 1: field 'concurrency'"),
        ('[{"id": "a",\n "tokens_per_s": 10,,}]', "line 2: not valid JSON"),
        ('{"id": "a"}', "a node file is a JSON list"),
    ],
)  # fmt: skip
def test_bad_node_files_name_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "nodes.json"
    path.write_text(text)
    with pytest.raises(InputFileError, match=message):
        load_nodes(path)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"t": 0, "prompt_tokens": 5, "output_tokens": 50}', '{"t": 1, "prompt_tokens": 5}'],
         "line 2: field 'output_tokens': Field required"),
        (['{"t": 0, "prompt_tokens": -5, "output_tokens": 50}'],
         "line 1: field 'prompt_tokens': Input should be greater than or equal to 0"),
        (['{"t": 5, "prompt_tokens": 5, "output_tokens": 50}', "",
          '{"t": 3, "prompt_tokens": 5, "output_tokens": 50}'],
         "line 3: field 't': 3.0 is earlier than the line before"),
        (["not json"], "line 1: field '\\(whole line\\)'"),
    ],
)  # fmt: skip
def test_bad_traces_name_line_and_field(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputFileError, match=message):
        load_trace(path)


def test_cli_refuses_bad_input_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "trace.jsonl"
    bad.write_text(
        '{"t": 2, "prompt_tokens": 1, "output_tokens": 5}\n{"t": 1, "prompt_tokens": 1}\n'
    )
    assert main(["simulate", "--trace", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "output_tokens" in err and "Traceback" not in err
    assert main(["simulate", "--policy", "fastest"]) == 2
    assert "valid: random, weighted" in capsys.readouterr().err


def test_cli_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--horizon", "300", "--seeds", "2", "--json"]
    assert main([*args, "--policy", "load_aware", "--policy", "earliest_finish"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["policies"]) == ["load_aware", "earliest_finish"]
    for stats in report["policies"].values():
        keys = {"requests", "processed_edge", "rejected_edge", "cloud", "failed", "cloud_cost_usd",
                "latency_mean_s", "latency_p95_s", "utilization"}  # fmt: skip
        assert keys <= set(stats)
        assert len(stats["utilization"]) == 8 and len(stats["per_seed"]) == 2
        assert stats["requests"] == sum(s["requests"] for s in stats["per_seed"])
    assert report["lower_bound"]["cloud_cost_usd"] >= 0


def test_cli_writes_example_files_and_replays_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes, trace = tmp_path / "nodes.json", tmp_path / "trace.jsonl"
    argv = ["simulate", "--horizon", "120", "--fleet", "agx_orin=1,orin_nano=1"]
    assert main([*argv, "--write-nodes", str(nodes), "--write-trace", str(trace)]) == 0
    assert [n.id for n in load_nodes(nodes)] == ["agx-orin-1", "orin-nano-1"]
    assert (
        main(["simulate", "--nodes", str(nodes), "--trace", str(trace), "--policy", "random"]) == 0
    )
    out = capsys.readouterr().out
    assert "random" in out and "lower bound" in out


def test_cli_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    png = tmp_path / "fig6.png"
    argv = ["simulate", "--horizon", "120", "--policy", "all", "--plot", str(png)]
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert main(argv) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    assert main(argv) == 1
    assert "pip install 'edgecollab[plot]'" in capsys.readouterr().err


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_bound_handles_per_size_limits() -> None:
    requests = [Arrival(0.0, 0, 100), Arrival(0.0, 0, 50)]
    nodes = [node(rate=10, beta=0.0)]
    # the 50-token request may take 5 s, the 100-token one 0 s: only 50 tokens can be served
    bound = lower_bound_cost(requests, nodes, CLOUD.prices, max_latency_s={50: 5.0, 100: 0.0})
    assert bound == pytest.approx(100 * 60e-6)
    assert not math.isnan(bound)


@dataclass
class Recorder:
    """load_aware that records every Demand it is shown and the Fleet's in-flight estimates."""

    demands: list[Demand] = field(default_factory=list)
    in_flight: list[LengthEstimate] = field(default_factory=list)
    name: ClassVar[str] = "recorder"
    uses_lengths: ClassVar[bool] = True

    def choose(self, demand: Demand, fleet: Fleet, rng: random.Random) -> Decision:
        self.demands.append(demand)
        for agent in fleet.agents:
            self.in_flight += [estimate for _, estimate in fleet.in_flight(agent)]
        return make_policy("load_aware").choose(demand, fleet, rng)


def odd_lengths_trace() -> list[Arrival]:
    """Requests whose true lengths all differ, so none can be guessed from another; code answers
    are long (300-359 tokens), math ones short (30-89), general ones in between."""
    labels = [("code", "hard", 300), ("math", "easy", 30), ("general", None, 100)]
    return [
        Arrival(0.7 * i, 20, base + i, 512, domain, difficulty)
        for i, (domain, difficulty, base) in ((i, labels[i % 3]) for i in range(60))
    ]


def test_the_simulator_never_shows_a_policy_the_true_length() -> None:
    requests = odd_lengths_trace()
    nodes = [node(rate=20, limit=2, id="a"), node(rate=20, limit=2, id="b")]
    for knowledge in ("predicted", "max_tokens"):
        recorder = Recorder()
        simulate(requests, nodes, recorder, cloud=CLOUD, knowledge=knowledge)
        assert len(recorder.demands) == len(requests)
        for request, demand in zip(requests, recorder.demands, strict=True):
            assert not hasattr(demand, "output_tokens")
            assert request.output_tokens not in demand.estimate.support
            assert (demand.max_tokens, demand.domain, demand.difficulty) == (
                request.max_tokens, request.domain, request.difficulty,
            )  # fmt: skip
        truths = {r.output_tokens for r in requests}
        assert recorder.in_flight, "some requests were in flight at arrivals"
        if knowledge == "predicted":  # the Fleet's estimates of running requests are guesses
            assert not any(e.exact for e in recorder.in_flight)
        else:  # the cap, for every request
            assert {e.support for e in recorder.in_flight} == {(512.0,)}
        assert not any(set(e.support) & truths for e in recorder.in_flight)
    recorder = Recorder()
    simulate(requests, nodes, recorder, cloud=CLOUD, knowledge="oracle")
    for request, demand in zip(requests, recorder.demands, strict=True):
        assert demand.estimate.exact and demand.estimate.support == (request.output_tokens,)


def test_the_predictor_learns_within_a_run() -> None:
    requests = odd_lengths_trace()
    recorder = Recorder()
    result = simulate(requests, [node(rate=50, limit=8)], recorder, cloud=CLOUD)
    late = {d.domain: d.estimate.mean for d in recorder.demands[-3:]}
    assert late["math"] < late["code"]  # learned from the finished ones, not from the prior
    assert result.predicted_tokens == [d.estimate.mean for d in recorder.demands]


def test_knowledge_changes_only_length_aware_policies() -> None:
    scenario = load_scenario()
    requests = generate_workload(scenario.workload, horizon_s=600, seed=1)
    costs = {}
    for knowledge in ("oracle", "predicted", "max_tokens"):
        for name in ("load_aware", "earliest_finish"):
            result = simulate(
                requests, scenario.nodes(), make_policy(name), cloud=CLOUD, knowledge=knowledge
            )
            costs[name, knowledge] = result.tally.cloud_cost_usd
    assert len({costs["load_aware", k] for k in ("oracle", "predicted", "max_tokens")}) == 1
    assert len({costs["earliest_finish", k] for k in ("oracle", "predicted", "max_tokens")}) == 3
    with pytest.raises(ValueError, match="valid: oracle, predicted, max_tokens"):
        simulate(requests, scenario.nodes(), make_policy("random"), knowledge="psychic")  # type: ignore[arg-type]


def test_generated_labels_follow_the_classifier_table() -> None:
    spec = load_scenario().workload
    assert spec.max_tokens == 512 and spec.labels is not None
    requests = generate_workload(spec, horizon_s=3600, seed=2)
    plain = generate_workload(spec.model_copy(update={"labels": None}), horizon_s=3600, seed=2)
    assert [(r.t, r.output_tokens) for r in requests] == [(r.t, r.output_tokens) for r in plain]
    assert {r.difficulty for r in plain} == {None} and {r.domain for r in plain} == {"general"}
    fits = sum((r.domain, r.difficulty) in consistent_pairs(r.output_tokens) for r in requests)
    # fidelity 0.5, plus the uniform half landing on a fitting pair by chance (1-5 of 15)
    assert 0.5 < fits / len(requests) < 0.75
    assert all(r.max_tokens == 512 and r.output_tokens <= 512 for r in requests)
    jittered = generate_workload(
        spec.model_copy(update={"length_sigma": 0.5, "max_tokens": 400}), horizon_s=600, seed=2
    )
    assert len({r.output_tokens for r in jittered}) > 50
    assert max(r.output_tokens for r in jittered) == 400


def test_trace_with_labels_round_trips(tmp_path: Path) -> None:
    requests = [Arrival(0.5, 10, 50, 256, "code", "hard"), Arrival(1.25, 20, 100)]
    write_trace(tmp_path / "trace.jsonl", requests)
    assert load_trace(tmp_path / "trace.jsonl") == requests
    (tmp_path / "old.jsonl").write_text('{"t": 0, "prompt_tokens": 5, "output_tokens": 50}\n')
    assert load_trace(tmp_path / "old.jsonl") == [Arrival(0.0, 5, 50, 512, "general", None)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"t": NaN, "prompt_tokens": 5, "output_tokens": 50}',
         "line 1: field 't': Input should be a finite number"),
        ('{"t": 1e400, "prompt_tokens": 5, "output_tokens": 50}',
         "line 1: field 't': Input should be a finite number"),
        ('{"t": 1e300, "prompt_tokens": 5, "output_tokens": 50}',
         "line 1: field 't': Input should be less than or equal to"),
        ('{"t": 0, "prompt_tokens": 5, "output_tokens": 1e12}',
         "line 1: field 'output_tokens': Input should be less than or equal to 4096"),
        ('{"t": 0, "prompt_tokens": 1e9, "output_tokens": 5}',
         "line 1: field 'prompt_tokens': Input should be less than or equal to 131072"),
        ('{"t": 0, "prompt_tokens": 5, "output_tokens": 5, "max_tokens": -1}',
         "line 1: field 'max_tokens': Input should be greater than or equal to 1"),
        ('{"t": 0, "prompt_tokens": 5, "output_tokens": 5, "max_tokens": 2.5}',
         "line 1: field 'max_tokens': Input should be a valid integer"),
        ('{"t": 0, "prompt_tokens": 5, "output_tokens": 600}',
         "line 1: field 'output_tokens': 600 is more than max_tokens \\(512, the default\\)"),
        ('{"t": 0, "prompt_tokens": 5, "output_tokens": 60, "max_tokens": 50}',
         "line 1: field 'output_tokens': 60 is more than max_tokens \\(50\\)"),
        ('{"t": 0, "prompt_tokens": 5, "output_tokens": 5, "difficulty": "extreme"}',
         "line 1: field 'difficulty': Input should be 'easy', 'medium' or 'hard'"),
        ('{"t": 0, "prompt_tokens": 5, "output_tokens": 5, "domain": "Not/A domain"}',
         "line 1: field 'domain': String should match pattern"),
    ],
)  # fmt: skip
def test_bad_trace_values_are_refused_with_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputFileError, match=message):
        load_trace(path)
    assert main(["simulate", "--trace", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err


def test_an_empty_trace_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "trace.jsonl"
    for text in ("", "\n\n  \n"):
        path.write_text(text)
        with pytest.raises(InputFileError, match="no requests"):
            load_trace(path)
        assert main(["simulate", "--trace", str(path)]) == 2
        err = capsys.readouterr().err
        assert err == f"edgecollab simulate: error: {path}: no requests (an empty trace)\n"


def test_cli_reports_every_knowledge_level(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--horizon", "600", "--json", "--knowledge", "all"]
    assert main([*args, "--policy", "load_aware", "--policy", "earliest_finish"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["knowledge"] == ["oracle", "predicted", "max_tokens"]
    keys = ["load_aware", *(f"earliest_finish@{k}" for k in report["knowledge"])]
    assert list(report["policies"]) == keys
    assert report["policies"]["load_aware"]["knowledge"] == "any"
    predicted = report["policies"]["earliest_finish@predicted"]
    assert {"mape", "pairwise", "tau_b"} <= set(predicted["length_prediction"])
    assert set(report["versus_load_aware"]["ratios"]) == set(keys)
    assert set(report["versus_load_aware"]["oracle_gain_kept"]) == {
        "earliest_finish@predicted", "earliest_finish@max_tokens",
    }  # fmt: skip
    assert 0 < report["label_signal"]["pairwise"] < 1
    assert main(["simulate", "--horizon", "60", "--clairvoyant", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["knowledge"] == ["oracle"]
    assert main(["simulate", "--knowledge", "psychic"]) == 2
    assert "valid: oracle, predicted, max_tokens, all" in capsys.readouterr().err
    assert main(["simulate", "--label-fidelity", "1.5"]) == 2
    assert "--label-fidelity must be in [0, 1]" in capsys.readouterr().err


def test_live_queries_carry_the_truth_only_where_emulated_models_read_it() -> None:
    from services.worker.emulated import planned_tokens
    from tools.bench.fake_cloud import FakeCloud
    from tools.bench.fig6 import query_text
    from tools.bench.labels import classify

    request = Arrival(0.0, 6, 300, 512, "code", "hard")
    text = query_text(request)
    assert text.split() == ["eos@300", "label@code/hard", "w", "w", "w", "w"]  # 6 "tokens"
    assert planned_tokens(text, 512) == 300 and planned_tokens(text, 100) == 100
    assert planned_tokens("no marker", 64) == 64
    labels = classify("r1", text, "fig6-labels")
    assert (labels.domain, labels.complexity.difficulty, labels.confidence) == ("code", "hard", 1)
    unlabelled = classify("r1", query_text(Arrival(0.0, 3, 50)), "fig6-labels")
    assert (unlabelled.domain, unlabelled.confidence) == ("general", 0.0)
    with FakeCloud(echo_max_tokens=True) as cloud:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 512}
        usage = cloud.completion(body)["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (6, 300)
