"""The gateway's dashboard in headless Chromium against a running stack.

The page must show the agents from the CMS and, live over server-sent events, a query sent
through the gateway after the page loaded, with its provenance, and the paper's Fig. 6 once
`edgecollab simulate --publish` has put it in the CMS. A screenshot is written to the test's
tmp dir.
"""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from tests.broker import ROOT
from tests.browser import Browser, chromium_binary
from tests.gateway_stack import start_gateway, wait_ready

pytestmark = pytest.mark.skipif(
    chromium_binary() is None, reason="chromium is not installed (tools/setup.sh installs it)"
)


def test_dashboard_shows_agents_a_new_query_and_fig6_live(spawn, uid, tmp_path, mqtt):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.worker", "--agent-id", f"w-{uid}", "--tokens-per-s", "200")
    gateway = start_gateway(spawn, uid, tmp_path)
    wait_ready(gateway, orchestrator=1, worker=1)

    browser = Browser(tmp_path, height=1300)
    try:
        browser.open(gateway.url + "/dashboard")
        browser.wait_until(f"document.querySelector('tr[data-agent=\"w-{uid}\"]')")
        row = browser.evaluate(f"document.querySelector('tr[data-agent=\"w-{uid}\"]').innerText")
        assert "online" in row and "emulated" in row
        assert browser.evaluate("document.getElementById('conn').className") == "live"

        question = f"Is the dashboard live, {uid}?"
        client = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.key, max_retries=0)
        client.chat.completions.create(
            model="edgecollab", messages=[{"role": "user", "content": question}], max_tokens=4
        )
        found = (
            "[...document.querySelectorAll('#queries tr[data-request]')]"
            f".find(r => r.innerText.includes({json.dumps(question)}))"
        )
        browser.wait_until(found, timeout=30)
        text = browser.evaluate(f"{found}.innerText")
        assert f"answer → w-{uid} (edge, ok" in text and "edge" in text
        browser.wait_until("document.querySelector('#rates [data-outcome=\"edge\"]')")

        simulated = subprocess.run(
            [sys.executable, "-m", "tools.cli.main", "simulate", "--horizon", "120", "--json",
             "--publish", "--broker", f"{mqtt.host}:{mqtt.port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert simulated.returncode == 0, simulated.stderr
        policies = json.loads(simulated.stdout)["policies"]
        bars = "[...document.querySelectorAll('#fig6 rect[data-metric=\"processed_edge\"]')]"
        browser.wait_until(f"{bars}.length === {len(policies)}", timeout=30)
        drawn = browser.evaluate(f"Object.fromEntries({bars}.map(r => [r.dataset.policy, "
                                 "[Number(r.dataset.value), r.getBBox().height]]))")  # fmt: skip
        panels = browser.evaluate("document.querySelectorAll('#fig6 g[data-panel]').length")
        shot = browser.screenshot(tmp_path / "dashboard.png")
    finally:
        browser.close()
    assert shot.stat().st_size > 10_000
    assert panels == 3 and set(drawn) == set(policies)
    assert all(drawn[p][0] == stats["processed_edge"] for p, stats in policies.items())
    assert all(height > 0 for _, height in drawn.values())
    print(f"screenshot: {shot}")
