"""`edgecollab bench quality`: its labelled set, its grading, and one small run (JSON shape only;
the tiny model's answers are noise, so nothing about accuracy or time is asserted)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.sandbox.runner import Sandbox
from tests.broker import ROOT
from tools.bench import quality
from tools.bench.quality import CodeItem, MathItem, SensorItem


def test_the_labelled_set_is_big_enough_and_well_formed():
    counts = {domain: len(quality.load(domain)) for domain in quality.DOMAINS}
    assert counts["code"] >= 40 and counts["math"] >= 40 and counts["facts"] >= 40
    assert counts["sensors"] >= 10
    for domain in quality.DOMAINS:
        ids = [item.id for item in quality.load(domain)]
        assert len(ids) == len(set(ids)), domain
    assert len(quality.load("math", 3)) == 3


def test_code_is_graded_by_its_asserts_in_the_sandbox():
    sandbox = asyncio.run(Sandbox.detect())
    item = CodeItem(id="c", prompt="-", function="double", asserts=["assert double(3) == 6"])
    fenced = "Here:\n```python\ndef double(x):\n    return 2 * x\n```\nIt doubles."
    bare = "def double(x):\n    return x * 2\n\nThis function doubles x."
    wrong = "```python\ndef double(x):\n    return x + 2\n```"
    other = "```python\ndef triple(x):\n    return 3 * x\n```"
    graded = [
        asyncio.run(quality.check_code(item, a, sandbox)) for a in (fenced, bare, wrong, other)
    ]
    assert graded == [True, True, False, False]
    assert quality.function_source(bare, "double") == "def double(x):\n    return x * 2\n"


def test_numbers_facts_and_sensor_answers():
    item = MathItem(id="m", question="-", answer=1550)
    assert quality.check_number(item.answer, "1200 + 350 = 1,550 books.")
    assert not quality.check_number(item.answer, "The library has 1550 books, not 1200.")
    assert quality.check_number(50, "They cost $50.00.") and not quality.check_number(5, "none")
    assert quality.mentions_any("It is Léonardo da Vinci!", ["leonardo da vinci"])
    assert quality.mentions_any("There are 7 continents.", ["7", "seven"])
    assert not quality.mentions_any("In 1776 it was.", ["7"])  # whole words only
    assert not quality.mentions_any("There are 7,981,960 of them.", ["7"])  # one number
    assert quality.mentions_any("It is 8,848 m high.", ["8848", "8,848"])
    sensor = SensorItem(id="s", domain="health", question="-", readings={"spo2": 88},
                        expect=[["88"], ["oxygen", "spo2"]])  # fmt: skip
    assert quality.check_sensor_answer(sensor, "Your SpO2 is 88%, low.")
    assert quality.check_sensor_answer(sensor, "SpO2 88.0 % (steady), below 92 %.")  # a reading
    assert not quality.check_sensor_answer(sensor, "SpO2 880 %, oxygen")
    assert quality.mentions_any("body temperature 36.6 °C", ["36.6"])
    assert not quality.check_sensor_answer(sensor, "Your SpO2 is fine.")


@pytest.mark.timeout(600)
def test_bench_quality_runs_both_stacks_on_the_tiny_model(tiny_model_dir: Path, minilm_dir: Path):
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "bench", "quality", "--limit", "1",
         "--model", str(tiny_model_dir), "--code-model", "none",
         "--classifier-model", str(minilm_dir), "--timeout", "120"],
        cwd=ROOT, capture_output=True, text=True, timeout=590,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["limit"] == 1 and set(report["stacks"]) == {"alone", "cooperating"}
    assert report["items"] == dict.fromkeys(quality.DOMAINS, 1)
    assert "sandbox" in report["stacks"]["cooperating"]["services"]
    assert "sandbox" not in report["stacks"]["alone"]["services"]
    for stack in report["stacks"].values():
        assert set(stack["domains"]) == set(quality.DOMAINS)
        for result in stack["domains"].values():
            assert result["n"] == 1 and 0 <= result["correct"] <= 1
            assert set(result) >= {"accuracy", "p50_ms", "failed", "paths"}
            assert sum(result["paths"].values()) == 1
