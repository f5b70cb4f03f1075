"""Allocation policies and the Fleet view, on crafted fleets (no broker, no simulator)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

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


def fill(fleet: Fleet, agent: str, n: int, tokens: int = 100) -> None:
    for _ in range(n):
        fleet.started(agent, tokens)


def picks(policy_name: str, fleet: Fleet, n: int = 4000) -> Counter[str | None]:
    policy, rng = make_policy(policy_name), random.Random(1)
    return Counter(policy.choose(Demand(100, 100), fleet, rng).agent for _ in range(n))


def test_make_policy_lists_valid_names() -> None:
    assert set(POLICIES) == {"random", "weighted", "load_aware", "earliest_finish"}
    with pytest.raises(ValueError, match="random, weighted, load_aware, earliest_finish"):
        make_policy("fastest")


@pytest.mark.parametrize("name", list(POLICIES))
def test_empty_fleet_goes_to_cloud(name: str) -> None:
    assert make_policy(name).choose(Demand(10, 10), Fleet(), random.Random(0)) == CLOUD


def test_fleet_accounting_and_removal() -> None:
    fleet = fleet_of(("a", 60, 2), ("b", 30, 4), ("c", 10, 1))
    fill(fleet, "a", 2)
    fleet.enqueued("a", 50)
    fill(fleet, "b", 1)
    assert fleet.utilization().tolist() == [1.5, 0.25, 0.0]
    assert (fleet.has_slot("a"), fleet.has_slot("b")) == (False, True)
    fleet.remove("a")
    assert fleet.agents == ["c", "b"]
    assert fleet.utilization().tolist() == [0.0, 0.25]
    assert fleet.rate.tolist() == [10, 30]
    fleet.finished("b", 100)
    fleet.finished("b", 100)  # more finishes than starts are ignored
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
    assert make_policy("load_aware").choose(Demand(1, 1), fleet, random.Random(0)) == Decision("a")


def test_earliest_finish_takes_the_fastest_free_stream() -> None:
    fleet = fleet_of(("agx", 60, 8), ("nano", 27.7, 4))
    policy, rng = EarliestFinishPolicy(), random.Random(0)
    fill(fleet, "agx", 3)  # a 4th stream gets 60/sqrt(4) = 30 tok/s > 27.7
    assert policy.choose(Demand(10, 100), fleet, rng) == Decision("agx")
    fill(fleet, "agx", 1)  # a 5th gets 60/sqrt(5) = 26.8 tok/s < 27.7
    assert policy.choose(Demand(10, 100), fleet, rng) == Decision("nano")


def test_slot_wait_follows_the_end_marks() -> None:
    clock = Clock()
    fleet = fleet_of(("n", 10, 2), beta=1.0, clock=clock)  # every stream decodes 10 tok/s
    fleet.started("n", 100)
    fleet.started("n", 50)
    clock.t = 2.0
    assert fleet.slot_wait()[0] == pytest.approx(3.0)  # the 50-token stream ends at t=5
    fleet.enqueued("n", 20)
    assert fleet.slot_wait()[0] == pytest.approx(8.0)  # 2nd in line: the 100-token one, t=10
    fleet.enqueued("n", 20)
    # 3rd in line: one more departure, a mean waiting request (20 tokens) at 20 tok/s in all
    assert fleet.slot_wait()[0] == pytest.approx(8.0 + 20 / 20)
    clock.t = 5.0
    fleet.finished("n", 50)
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
    assert policy.choose(Demand(5, 100), fleet, random.Random(0)) == Decision("fast", 17.5)
    # 20 tokens: slow 3 + 2 = 5 beats fast 10 + 0.5
    assert policy.choose(Demand(5, 20), fleet, random.Random(0)) == Decision("slow", 18.0)
    # 500 tokens: best is fast at 10 + 12.5 = 22.5 > 20 s -> straight to the cloud
    assert policy.choose(Demand(5, 500), fleet, random.Random(0)) == CLOUD
    longer = EarliestFinishPolicy(deadline_s=20.0, deadline_per_token_s=0.01)
    assert longer.choose(Demand(5, 500), fleet, random.Random(0)) == Decision("fast", 12.5)
