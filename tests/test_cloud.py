"""The cloud client against a real local HTTP server speaking the chat-completions API."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from services.orchestrator.cloud import CloudClient, CloudError, CloudSettings
from services.scheduling.outcomes import Prices
from tools.bench.fake_cloud import FakeCloud


def settings_for(cloud: FakeCloud, **overrides: object) -> CloudSettings:
    values: dict[str, object] = {
        "base_url": cloud.url,
        "api_key": SecretStr(cloud.api_key),
        "model": "gpt-4",
        "timeout_s": 2.0,
        "retries": 2,
        "backoff_s": 0.01,
    }
    return CloudSettings(**{**values, **overrides})


async def ask(settings: CloudSettings) -> object:
    async with CloudClient(settings) as client:
        return await client.complete(
            [{"role": "user", "content": "how warm is it?"}], max_tokens=64, request_id="r1"
        )


async def test_reply_usage_and_cost_at_gpt4_prices() -> None:
    with FakeCloud(reply="It is 21 degrees.", usage=(1000, 2000)) as cloud:
        reply = await ask(settings_for(cloud))
    assert reply.text == "It is 21 degrees."
    assert (reply.prompt_tokens, reply.output_tokens, reply.attempts) == (1000, 2000, 1)
    assert reply.cost_usd == pytest.approx(1000 * 30e-6 + 2000 * 60e-6)  # $0.15
    sent = cloud.requests[0]
    assert sent["headers"]["Authorization"] == f"Bearer {cloud.api_key}"
    assert sent["body"]["model"] == "gpt-4"
    assert sent["body"]["max_tokens"] == 64
    assert sent["body"]["messages"] == [{"role": "user", "content": "how warm is it?"}]


async def test_custom_prices() -> None:
    prices = Prices(usd_per_1m_input=1.0, usd_per_1m_output=2.0)
    with FakeCloud(usage=(500_000, 250_000)) as cloud:
        reply = await ask(settings_for(cloud, prices=prices))
    assert reply.cost_usd == pytest.approx(1.0)


async def test_429_5xx_and_garbage_are_retried_then_succeed() -> None:
    with FakeCloud(usage=(10, 5), faults=["429", "503", "garbage"]) as cloud:
        reply = await ask(settings_for(cloud, retries=3))
    assert reply.attempts == 4
    assert len(cloud.requests) == 4
    assert reply.output_tokens == 5


@pytest.mark.parametrize("fault", ["500", "garbage", "partial", "drop"])
async def test_retries_are_bounded_then_cloud_error(fault: str) -> None:
    with FakeCloud(faults=[fault] * 10) as cloud, pytest.raises(CloudError) as error:
        await ask(settings_for(cloud, retries=2))
    assert len(cloud.requests) == 3
    assert error.value.attempts == 3


async def test_timeout_is_retried_and_bounded() -> None:
    with FakeCloud(faults=["hang", "hang"]) as cloud:  # unanswered until the server stops
        with pytest.raises(CloudError, match="timed out"):
            await ask(settings_for(cloud, timeout_s=0.2, retries=1))
        assert len(cloud.requests) == 2
        cloud.faults.extend(["hang"])
        # the answering attempt has the same ample time as in the other tests
        reply = await ask(settings_for(cloud, retries=1))
    assert reply.attempts == 2 and len(cloud.requests) == 4


async def test_client_errors_are_not_retried() -> None:
    with FakeCloud() as cloud, pytest.raises(CloudError) as error:
        await ask(settings_for(cloud, api_key=SecretStr("sk-wrong")))
    assert error.value.status == 401
    assert len(cloud.requests) == 1


async def test_unreachable_endpoint_fails_cleanly() -> None:
    with FakeCloud() as cloud:
        url = cloud.url
    with pytest.raises(CloudError, match="transport error"):
        await ask(CloudSettings(base_url=url, retries=1, backoff_s=0.01, timeout_s=1.0))


async def test_api_key_never_in_logs_errors_or_repr() -> None:
    with FakeCloud(faults=["429", "500", "garbage"]) as cloud:
        settings = settings_for(cloud, retries=2)
        with capture_logs() as logs, pytest.raises(CloudError) as error:
            await ask(settings)
    assert [e["event"] for e in logs] == ["cloud.retry", "cloud.retry"]
    assert {e["reason"] for e in logs} >= {"HTTP 429", "HTTP 500"}
    for text in (str(logs), str(error.value), repr(settings), str(settings.model_dump())):
        assert cloud.api_key not in text
