"""The gateway's dashboard in headless Chromium against a running stack.

The page must show the agents from the CMS and, live over server-sent events, a query sent
through the gateway after the page loaded, with its provenance. A screenshot is written to
the test's tmp dir.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.browser import Browser, chromium_binary
from tests.gateway_stack import start_gateway, wait_ready

pytestmark = pytest.mark.skipif(
    chromium_binary() is None, reason="chromium is not installed (tools/setup.sh installs it)"
)


def test_dashboard_shows_agents_and_a_new_query_live(spawn, uid, tmp_path):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn("services.worker", "--agent-id", f"w-{uid}", "--tokens-per-s", "200")
    gateway = start_gateway(spawn, uid, tmp_path, "--embedder-dir", "")
    wait_ready(gateway, orchestrator=1, worker=1)

    browser = Browser(tmp_path)
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
        shot = browser.screenshot(tmp_path / "dashboard.png")
    finally:
        browser.close()
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
