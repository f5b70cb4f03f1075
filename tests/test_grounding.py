"""Grounding is pure: facts from windows, the measured part composed, numbers checked."""

from __future__ import annotations

import pytest

from schemas import Fact
from services.data.features import Sample
from services.data.grounding import (
    check,
    claims,
    clinician_report,
    compose,
    fact,
    measured,
    supported,
)
from services.data.streams import STREAMS

T0 = 1_700_000_000.0


def window(name: str, values: list[float], domain: str = "health") -> tuple:
    return STREAMS[(domain, name)], [Sample(T0 + i, v) for i, v in enumerate(values)]


def facts_of(agent: str, **streams: list[float]) -> list[Fact]:
    out = []
    for name, values in streams.items():
        domain = (
            "environment" if name in ("pm25", "no2", "noise", "traffic", "camera") else "health"
        )
        made = fact(agent, *window(name, values, domain))
        assert made is not None
        out.append(made)
    return out


WATCH = facts_of("watch-7", heart_rate=[148, 148, 148, 148, 148])
FEVER = facts_of(
    "wearable-1",
    heart_rate=[96, 104, 112, 120, 128],
    spo2=[95, 94, 93, 92, 91],
    body_temp=[38.2, 38.5, 38.8, 39.0, 39.1],
    activity=[10, 8, 5, 3, 2],
)


def test_a_fact_is_the_window_of_one_stream_with_its_alert():
    hr = WATCH[0]
    assert (hr.agent, hr.stream, hr.value, hr.unit, hr.n) == (
        "watch-7",
        "heart_rate",
        148,
        "bpm",
        5,
    )
    assert (hr.alert, hr.threshold, hr.side, hr.trend) == ("tachycardia", 100, "above", "steady")
    assert (hr.ts, hr.since) == (T0 + 4, T0)
    spo2 = FEVER[1]
    assert (spo2.alert, spo2.threshold, spo2.side, spo2.trend) == (
        "low oxygen saturation",
        92,
        "below",
        "falling",
    )
    assert FEVER[3].alert is None and FEVER[3].threshold is None  # activity has no alert
    assert fact("x", STREAMS[("health", "heart_rate")], [Sample(T0, None, "no value")]) is None


def test_the_measured_part_names_every_alerted_stream_with_value_unit_trend_threshold():
    text = measured("health", FEVER)
    assert text.startswith("Measured by wearable-1 (5 readings, last 4 s): ")
    for phrase in (
        "heart rate 128 bpm (rising), above the tachycardia threshold of 100 bpm",
        "SpO2 91 % (falling), below the low oxygen saturation threshold of 92 %",
        "body temperature 39.1 °C (rising), above the fever threshold of 38.0 °C",
        "No alert: activity 2 steps/min.",
    ):
        assert phrase in text
    assert measured("health", []) == "No readings were available."
    quiet = facts_of("ring-1", heart_rate=[70, 71, 72])
    assert measured("health", quiet) == (
        "Measured by ring-1 (3 readings, last 2 s): nothing past an alert threshold. "
        "No alert: heart rate 72 bpm."
    )


def test_the_city_part_lists_each_risk_with_its_live_number_and_sensor():
    city = facts_of("camera-1", camera=[150, 180, 210]) + facts_of("air-1", pm25=[20, 30, 48.3])
    city += facts_of("noise-1", noise=[60, 61, 62.5])
    text = measured("environment", city)
    assert text == (
        "Risks now: crowd: 210 people in view (camera-1, rising), above 100 people; "
        "unhealthy air: PM2.5 48.3 µg/m³ (air-1, rising), above 35.0 µg/m³. "
        "Within limits: noise 62.5 dB(A) (noise-1)."
    )


def test_the_clinician_report_is_built_from_the_readings():
    report = clinician_report(FEVER)
    lines = report.splitlines()
    assert lines[0] == "Clinician report (from the readings):"
    assert lines[1].startswith("wearable-1, ") and lines[1].endswith(" UTC:")
    assert lines[2] == (
        "- heart rate: 128 bpm (mean 112, range 96-128, rising, 5 readings); "
        "ALERT tachycardia (above 100 bpm)"
    )
    assert lines[-1] == (
        "- activity: 2 steps/min (mean 6, range 2-10, falling, 5 readings); no alert"
    )


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("a heart rate of 180 bpm", [(180, "bpm", 0)]),
        ("148 beats per minute", [(148, "bpm", 0)]),
        ("SpO2 of 91% and 39.1 °C", [(91, "%", 0), (39.1, "°C", 1)]),
        (
            "39.1 C, 39 degrees Celsius, 102.4 °F",
            [(39.1, "°C", 1), (39, "°C", 0), (102.4, "°F", 1)],
        ),
        ("between 60 and 100-130 bpm", [(100, "bpm", 0), (130, "bpm", 0)]),
        ("PM2.5 at 41 ug/m3, NO2 250 µg/m³", [(41, "µg/m³", 0), (250, "µg/m³", 0)]),
        (
            "1,200 people, 75 dB(A), 140/90 mmHg",
            [(1200, "people", 0), (75, "dB(A)", 0), (90, "mmHg", 0)],
        ),
        ("take 500 mg, rest 24 hours, call 112", []),  # doses, durations: not readings
    ],
)
def test_numbers_with_units_are_found_in_text(text, found):
    assert [(c.value, c.unit, c.decimals) for c in claims(text)] == found


def test_a_generated_180_bpm_when_148_was_measured_is_removed_and_148_is_kept():
    text = "Your heart rate of 180 bpm is very high. Sit down and drink water."
    checked = check(text, WATCH)
    assert checked.text == "Sit down and drink water."
    assert checked.unverified == ["180 bpm"] and not checked.verified and checked.removed == 1
    kept = check("A heart rate of 148 bpm is high. Sit down.", WATCH)
    assert kept.text == "A heart rate of 148 bpm is high. Sit down." and kept.verified


def test_a_claim_matches_to_the_precision_it_is_written_and_the_threshold_counts():
    temp = FEVER[2]  # 39.1 °C, mean 38.72, range 38.2-39.1, threshold 38.0
    assert supported(claims("39.1 °C")[0], [temp]) and supported(claims("39 °C")[0], [temp])
    assert not supported(claims("39.4 °C")[0], [temp])
    assert supported(claims("above 38 degrees")[0], [temp])  # the alert threshold
    assert not supported(claims("102.4 °F")[0], [temp])  # never measured in °F
    assert not supported(claims("39.1 %")[0], [temp])  # the unit must match too


def test_compose_puts_the_measured_part_first_then_the_checked_advice_then_the_report():
    checked = check("Rest and drink. Your pulse of 180 bpm is worrying.", WATCH)
    text = compose("health", WATCH, advice=checked.text, removed=checked.removed, report=True)
    parts = text.split("\n\n")
    assert parts[0].startswith("Measured by watch-7") and "148 bpm" in parts[0]
    assert parts[1] == "Advice: Rest and drink."
    assert parts[2] == "(Removed 1 generated sentence citing a value that no reading supports.)"
    assert parts[3].startswith("Clinician report (from the readings):")
    assert "180" not in text
    failed = compose("environment", [], advice=None, missing="rejected: no worker")
    assert (
        failed == "No readings were available.\n\n(recommendation unavailable: rejected: no worker)"
    )


def test_the_grounding_bench_scores_an_answer_on_its_text_against_the_scenario():
    from schemas import Answer, Step
    from tools.bench.grounding import load, score, summary

    scenarios = {s.id: s for s in load()}
    assert len(scenarios) == 10 and {s.domain for s in scenarios.values()} == {
        "health",
        "environment",
    }
    readme = scenarios["readme-watch"]
    steps = [
        Step(name="classify", topic="t", agent="c", where="edge", outcome="ok", detail="health"),
        Step(name="data:watch-x1", topic="t", agent="watch-x1", where="edge", outcome="ok"),
    ]
    good = Answer(request_id="r", text="Measured: heart rate 148 bpm, above 100 bpm.",
                  outcome="edge", steps=steps)  # fmt: skip
    bad = Answer(request_id="r", text="Your heart rate is 180 beats per minute.", outcome="edge")
    scored = [score(readme, good, "x1"), score(readme, bad, "x1")]
    assert scored[0].named and scored[0].unmeasured == [] and scored[0].devices_used == ["watch"]
    assert scored[0].domain == "health" and scored[1].domain == "-"
    assert not scored[1].named and scored[1].unmeasured == ["180 beats per minute"]
    assert scored[1].missing == ["watch: heart rate 148 bpm"]
    result = summary(scored)
    assert result["named_every_abnormal_value"] == 0.5
    assert result["answers_citing_unmeasured_values"] == 1


def test_a_retrieved_range_stands_beside_its_stream_and_is_no_unmeasured_value():
    from schemas import Answer, Passage
    from services.data.grounding import quoted, reference, sources
    from tools.bench.grounding import load, score

    ref = Passage(id="health/h.md#0", domain="health", document="h.md", title="Resting heart rate",
                  text="...", source="MedlinePlus, Vital signs", cite="MedlinePlus",
                  matched="stream", stream="heart_rate", low=60, high=100, unit="bpm",
                  label="normal at rest")  # fmt: skip
    near = ref.model_copy(update={"id": "health/h.md#1", "title": "Fever", "source": "CDC",
                                  "cite": "CDC", "matched": "text", "stream": None, "low": None,
                                  "high": None, "unit": None, "label": None})  # fmt: skip
    assert reference(ref) == "normal at rest: 60-100 bpm [MedlinePlus]"
    assert reference(ref.model_copy(update={"low": None, "label": None})) == (
        "at most 100 bpm [MedlinePlus]"
    )
    text = compose("health", WATCH, advice="Rest.", passages=[ref, near])
    assert "148 bpm (steady), above the tachycardia threshold of 100 bpm, normal at rest: " \
           "60-100 bpm [MedlinePlus]" in text  # fmt: skip
    assert text.endswith("Sources: [MedlinePlus] MedlinePlus, Vital signs; [CDC] CDC")
    assert sources([]) == ""
    checked = check("A resting pulse is 60-100 bpm. Yours was 180 bpm.", WATCH, [ref])
    assert checked.text == "A resting pulse is 60-100 bpm." and checked.unverified == ["180 bpm"]
    fever = near.model_copy(update={"text": "A fever is 38 °C (100.4 °F) or higher."})
    checked = check("Fever starts at 38 °C. Call at 41 °C.", [], [fever])
    answer = quoted(checked.text, [fever], removed=checked.removed)
    assert answer == (
        "Fever starts at 38 °C.\n\n(Removed 1 generated sentence citing a value that no passage "
        "states.)\n\nFrom the knowledge base [CDC], Fever: A fever is 38 °C (100.4 °F) or "
        "higher.\n\nSources: [CDC] CDC"
    )
    readme = next(s for s in load() if s.id == "readme-watch")
    answer = Answer(request_id="r", text=text, outcome="edge", passages=[ref])
    assert score(readme, answer, "x").unmeasured == []
    assert score(readme, answer.model_copy(update={"passages": []}), "x").unmeasured == [
        "60-100 bpm"
    ]
