"""Allocation policies and the Fleet view, on crafted fleets (no broker, no simulator)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from services.scheduling.lengths import LengthEstimate, LengthPredictor, prediction_errors
from services.scheduling.policies import (
    CLOUD,
    POLICIES,
    Decision,
    Demand,
    EarliestFinishPolicy,
    Fleet,
    make_policy,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def fleet_of(
    *nodes: tuple[str, float, int], beta: float = 0.5, clock: Clock | None = None
) -> Fleet:
    fleet = Fleet(clock=clock or Clock())
    for agent, rate, limit in nodes:
        fleet.upsert(agent, tokens_per_s=rate, concurrency=limit, beta=beta)
    return fleet


def fill(fleet: Fleet, agent: str, n: int, tokens: int = 100) -> list[int]:
    return [fleet.started(agent, tokens) for _ in range(n)]


def picks(policy_name: str, fleet: Fleet, n: int = 4000) -> Counter[str | None]:
    policy, rng = make_policy(policy_name), random.Random(1)
    return Counter(policy.choose(Demand.of(100, 100), fleet, rng).agent for _ in range(n))


def test_make_policy_lists_valid_names() -> None:
    assert set(POLICIES) == {"random", "weighted", "load_aware", "earliest_finish"}
    with pytest.raises(ValueError, match="random, weighted, load_aware, earliest_finish"):
        make_policy("fastest")


@pytest.mark.parametrize("name", list(POLICIES))
def test_empty_fleet_goes_to_cloud(name: str) -> None:
    assert make_policy(name).choose(Demand.of(10, 10), Fleet(), random.Random(0)) == CLOUD


def test_fleet_accounting_and_removal() -> None:
    fleet = fleet_of(("a", 60, 2), ("b", 30, 4), ("c", 10, 1))
    fill(fleet, "a", 2)
    fleet.enqueued("a", 50)
    (ticket,) = fill(fleet, "b", 1)
    assert fleet.utilization().tolist() == [1.5, 0.25, 0.0]
    assert (fleet.has_slot("a"), fleet.has_slot("b")) == (False, True)
    fleet.remove("a")
    assert fleet.agents == ["c", "b"]
    assert fleet.utilization().tolist() == [0.0, 0.25]
    assert fleet.rate.tolist() == [10, 30]
    fleet.finished("b", ticket)
    fleet.finished("b", ticket)  # a ticket ends once; more finishes are ignored
    fleet.finished("gone", 10)
    fleet.remove("gone")
    assert fleet.active.tolist() == [0, 0]


def test_fleet_grows_past_its_initial_arrays() -> None:
    fleet = fleet_of(*[(f"n{i}", 10.0 + i, 2) for i in range(50)])
    fill(fleet, "n49", 2)
    assert len(fleet) == 50
    assert fleet.utilization()[49] == 1.0
    assert fleet.rate[49] == 59.0


def test_random_ignores_capacity() -> None:
    fleet = fleet_of(("big", 60, 8), ("full", 10, 1))
    fill(fleet, "full", 1)
    counts = picks("random", fleet)
    assert 1800 < counts["full"] < 2200  # half of the picks, although it is full


def test_weighted_follows_token_rate() -> None:
    counts = picks("weighted", fleet_of(("fast", 30, 4), ("slow", 10, 4)))
    assert 2800 < counts["fast"] < 3200  # 3/4 of the picks


def test_load_aware_picks_least_utilized_and_breaks_ties_at_random() -> None:
    fleet = fleet_of(("a", 60, 8), ("b", 27.7, 4), ("c", 27.7, 4))
    fill(fleet, "a", 3)  # 3/8
    fill(fleet, "b", 1)  # 1/4
    fill(fleet, "c", 1)  # 1/4
    counts = picks("load_aware", fleet, 1000)
    assert counts["a"] == 0
    assert counts["b"] > 400 and counts["c"] > 400


def test_load_aware_sends_to_a_full_node_when_all_are_full() -> None:
    fleet = fleet_of(("a", 60, 1))
    fill(fleet, "a", 1)
    choice = make_policy("load_aware").choose(Demand.of(1, 1), fleet, random.Random(0))
    assert choice == Decision("a")


def test_earliest_finish_takes_the_fastest_free_stream() -> None:
    fleet = fleet_of(("agx", 60, 8), ("nano", 27.7, 4))
    policy, rng = EarliestFinishPolicy(), random.Random(0)
    fill(fleet, "agx", 3)  # a 4th stream gets 60/sqrt(4) = 30 tok/s > 27.7
    assert policy.choose(Demand.of(10, 100), fleet, rng) == Decision("agx")
    fill(fleet, "agx", 1)  # a 5th gets 60/sqrt(5) = 26.8 tok/s < 27.7
    assert policy.choose(Demand.of(10, 100), fleet, rng) == Decision("nano")


def test_slot_wait_follows_the_end_marks() -> None:
    clock = Clock()
    fleet = fleet_of(("n", 10, 2), beta=1.0, clock=clock)  # every stream decodes 10 tok/s
    fleet.started("n", 100)
    fifty = fleet.started("n", 50)
    clock.t = 2.0
    assert fleet.slot_wait()[0] == pytest.approx(3.0)  # the 50-token stream ends at t=5
    fleet.enqueued("n", 20)
    assert fleet.slot_wait()[0] == pytest.approx(8.0)  # 2nd in line: the 100-token one, t=10
    fleet.enqueued("n", 20)
    # 3rd in line: one more departure, a mean waiting request (20 tokens) at 20 tok/s in all
    assert fleet.slot_wait()[0] == pytest.approx(8.0 + 20 / 20)
    clock.t = 5.0
    fleet.finished("n", fifty)
    fleet.dequeued("n", 20)
    fleet.started("n", 20)
    assert fleet.slot_wait()[0] == pytest.approx(5.0)  # 2nd in line again: t=10
    fleet.dequeued("n", 20)  # the other waiter gave up: first in line, the 20-token end at t=7
    assert fleet.slot_wait()[0] == pytest.approx(2.0)


def test_earliest_finish_waits_within_its_deadline_else_cloud() -> None:
    clock = Clock()
    fleet = fleet_of(("slow", 10, 1), ("fast", 40, 1), beta=1.0, clock=clock)
    fleet.started("slow", 30)  # free at t=3
    fleet.started("fast", 400)  # free at t=10
    policy = EarliestFinishPolicy(deadline_s=20.0, deadline_per_token_s=0.0)
    # 100 tokens: slow finishes at 3 + 10 = 13, fast at 10 + 2.5 = 12.5 -> fast, may wait 17.5 s
    assert policy.choose(Demand.of(5, 100), fleet, random.Random(0)) == Decision("fast", 17.5)
    # 20 tokens: slow 3 + 2 = 5 beats fast 10 + 0.5
    assert policy.choose(Demand.of(5, 20), fleet, random.Random(0)) == Decision("slow", 18.0)
    # 500 tokens: best is fast at 10 + 12.5 = 22.5 > 20 s -> straight to the cloud
    assert policy.choose(Demand.of(5, 500), fleet, random.Random(0)) == CLOUD
    longer = EarliestFinishPolicy(deadline_s=20.0, deadline_per_token_s=0.01)
    assert longer.choose(Demand.of(5, 500), fleet, random.Random(0)) == Decision("fast", 12.5)


def test_a_demand_holds_no_true_length() -> None:
    fields = set(Demand.__dataclass_fields__)
    assert fields == {"prompt_tokens", "estimate", "max_tokens", "domain", "difficulty"}
    demand = Demand.of(10, 100)
    assert demand.estimate.exact and demand.estimate.mean == 100 and demand.max_tokens == 100


SIZES, WEIGHTS = (50, 100, 200, 300, 500), (0.35, 0.25, 0.20, 0.12, 0.08)


def test_predictor_converges_on_a_known_distribution() -> None:
    rng = random.Random(7)
    sample = rng.choices(SIZES, WEIGHTS, k=20_000)
    predictor = LengthPredictor(prior_weight=5.0)
    for n in sample:
        predictor.observe(n)
    mass, means = predictor.distribution()
    prior_mass, prior_moment = LengthPredictor(prior_weight=5.0)._prior
    counts = Counter(sample)
    for size in SIZES:  # each size has a bin of its own: (count + 5 * prior) / (n + 5)
        b = predictor.bin_of(size)
        assert mass[b] == pytest.approx((counts[size] + 5 * prior_mass[b]) / 20_005, rel=1e-12)
        expected_mean = (counts[size] * size + 5 * prior_moment[b]) / (
            counts[size] + 5 * prior_mass[b]
        )
        assert means[b] == pytest.approx(expected_mean, rel=1e-12)
        assert counts[size] / 20_000 == pytest.approx(WEIGHTS[SIZES.index(size)], abs=0.01)
    estimate = predictor.predict(max_tokens=512)
    assert estimate.support == pytest.approx(SIZES, abs=0.05)  # the prior's tail is pruned
    assert estimate.mean == pytest.approx(sum(sample) / len(sample), rel=1e-3)
    assert estimate.quantile(0.5) == pytest.approx(100, abs=0.05)  # 35% are 50, 60% <= 100


def test_predictor_backs_off_to_the_parent_key_until_a_key_has_data() -> None:
    predictor = LengthPredictor(prior_weight=5.0)
    for _ in range(1000):
        predictor.observe(50, domain="math", difficulty="easy")
        predictor.observe(400, domain="code", difficulty="hard")
    predictor.observe(400, domain="math", difficulty="hard")
    pooled = predictor.predict(max_tokens=512)
    assert pooled.mean == pytest.approx(225, rel=0.01)
    assert predictor.predict(max_tokens=512, domain="math", difficulty="easy").mean == (
        pytest.approx(50, rel=0.01)
    )
    # one observation of (math, hard) against 5 pseudo-requests of "math" (mostly 50s)
    few = predictor.predict(max_tokens=512, domain="math", difficulty="hard")
    assert 50 < few.mean < 150
    assert predictor.count("math", "hard") == 1 and predictor.count() == 2001
    # a key with a model backs off to the same labels pooled over models
    model = predictor.predict(max_tokens=512, domain="code", difficulty="hard", model="qwen")
    assert model.mean == pytest.approx(400, rel=0.01)
    # the cap: what would run past max_tokens stops at it
    capped = predictor.predict(max_tokens=300, domain="code", difficulty="hard")
    assert capped.support[-1] == 300 and capped.mean <= 300


def test_expected_length_conditions_on_progress() -> None:
    both = LengthEstimate((50, 500), (0.5, 0.5), cap=512)
    assert both.expected_total(0) == (275.0, 50.0)  # changes once 50 tokens are passed
    assert both.expected_total(49) == (275.0, 50.0)
    assert both.expected_total(60) == (500.0, 500.0)  # it ran long: it is the long one
    assert both.remaining(60) == 440.0
    assert both.expected_total(505) == (512.0, 512.0)  # past every length: up to the cap
    assert both.given(60) == ((500.0,), (1.0,))
    exact = LengthEstimate.exactly(100, 512)
    assert exact.expected_total(150) == (100.0, math.inf)  # a point estimate never moves


def test_fleet_reestimates_streams_that_run_long() -> None:
    clock = Clock()
    fleet = fleet_of(("n", 10, 1), beta=1.0, clock=clock)  # one stream at 10 tok/s
    fleet.started("n", LengthEstimate((50, 500), (0.5, 0.5), cap=512))
    assert fleet.slot_wait()[0] == pytest.approx(27.5)  # 275 expected tokens
    clock.t = 4.0
    assert fleet.slot_wait()[0] == pytest.approx(23.5)
    clock.t = 6.0  # 60 tokens done: not the 50-token kind, so 440 more
    assert fleet.slot_wait()[0] == pytest.approx(44.0)
    assert fleet.in_flight("n")[0][0] == pytest.approx(60.0)


def test_slot_wait_is_the_expected_first_end_of_uncertain_streams() -> None:
    fleet = fleet_of(("n", 10, 2), beta=1.0)
    for _ in range(2):  # each 10 or 30 tokens, evens: the first end is 10 tokens w.p. 3/4
        fleet.started("n", LengthEstimate((10, 30), (0.5, 0.5), cap=64))
    assert fleet.slot_wait()[0] == pytest.approx((0.75 * 10 + 0.25 * 30) / 10)
    fleet.enqueued("n", 20)  # second in line: the later end, 10 w.p. 1/4, else 30
    assert fleet.slot_wait()[0] == pytest.approx((0.25 * 10 + 0.75 * 30) / 10)


def test_earliest_finish_judges_by_the_estimate_not_the_cap() -> None:
    fleet = fleet_of(("n", 10, 1), beta=1.0)
    fleet.started("n", 30)  # free at t=3
    policy = EarliestFinishPolicy(deadline_s=20.0, deadline_per_token_s=0.0)
    likely_short = LengthEstimate((40, 400), (0.9, 0.1), cap=512)  # mean 76: 3 + 7.6 s
    assert policy.choose(Demand(5, likely_short), fleet, random.Random(0)).agent == "n"
    cap_only = Demand.of(5, LengthEstimate.exactly(512))  # 3 + 51.2 s > 20 s: cloud
    assert policy.choose(cap_only, fleet, random.Random(0)) == CLOUD
    cautious = EarliestFinishPolicy(deadline_s=20.0, deadline_per_token_s=0.0, length_quantile=0.95)
    assert cautious.choose(Demand(5, likely_short), fleet, random.Random(0)) == CLOUD


def test_prediction_errors_by_hand() -> None:
    errors = prediction_errors([10, 20, 20, 40], [10, 20, 40, 30])
    assert errors["mape"] == pytest.approx((0 + 0 + 0.5 + 1 / 3) / 4, abs=1e-4)
    # 6 pairs, all with different true lengths: 4 in order, 1 reversed (true 40 > 30, predicted
    # 20 < 40), 1 tied in prediction (20, 20)
    assert errors["pairwise"] == pytest.approx((4 + 0.5) / 6, abs=1e-4)
    assert errors["tau_b"] == pytest.approx((4 - 1) / math.sqrt(6 * 5), abs=1e-4)


class StubView:
    """The little of a CmsView the Allocator reads: no agents, no changes."""

    def on_change(self, callback: object) -> None:
        pass

    def agent(self, agent: str) -> None:
        return None


async def test_the_live_allocator_predicts_and_learns_from_whole_answers() -> None:
    from schemas import TaskResult
    from services.orchestrator.allocator import Allocator

    allocator = Allocator(StubView(), make_policy("earliest_finish"), rng=random.Random(0))  # type: ignore[arg-type]
    allocator.fleet.upsert("w1", tokens_per_s=50, concurrency=2)
    labels = {"domain": "code", "difficulty": "hard"}
    for length, reason in ((300, "stop"), (512, "length"), (7, "deadline"), (9, "cancelled")):
        demand = allocator.demand(prompt_tokens=10, max_tokens=512, **labels)
        assert not demand.estimate.exact and demand.max_tokens == 512
        grant = await allocator.acquire(demand)
        assert grant.agent == "w1" and grant.ticket
        result = TaskResult(
            task_id="t1", agent="w1", text="x", ms=1.0, prompt_tokens=10,
            output_tokens=length, prefill_ms=0.0, decode_tok_s=1.0, finish_reason=reason,
        )  # fmt: skip
        allocator.release(grant, demand, result)
    # cut-off answers (deadline, cancelled) are not lengths; the two whole ones are learned
    assert allocator.predictor.count("code", "hard") == 2
    assert allocator.predictor.count("code", "hard", "slm") == 2
    assert allocator.fleet.active.tolist() == [0]
    learned = allocator.demand(prompt_tokens=10, max_tokens=512, **labels).estimate.mean
    assert 300 < learned < 512
    cap_only = Allocator(StubView(), make_policy("earliest_finish"), knowledge="max_tokens")  # type: ignore[arg-type]
    assert cap_only.demand(prompt_tokens=10, max_tokens=256).estimate.support == (256.0,)
