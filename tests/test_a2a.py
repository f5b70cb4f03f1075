"""The gateway as an A2A agent, driven by the official a2a-sdk client against a real stack."""

from __future__ import annotations

import httpx
import pytest
from a2a.client import A2ACardResolver, ClientConfig, create_client
from a2a.types import GetTaskRequest, Message, Part, Role, SendMessageRequest, TaskState
from a2a.utils.errors import TaskNotFoundError

from tests.gateway_stack import start_gateway, wait_ready


def ask(text: str) -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(message_id="m-1", role=Role.ROLE_USER, parts=[Part(text=text)])
    )


async def test_a2a_client_reads_the_card_and_sends_plain_and_streaming_messages(
    spawn, uid, tmp_path
):
    spawn("services.orchestrator", "--agent-id", f"orch-{uid}")
    spawn(
        "services.worker",
        "--agent-id",
        f"w-{uid}",
        "--tokens-per-s",
        "200",
        "--domains",
        '["health"]',
    )
    gateway = start_gateway(spawn, uid, tmp_path, "--max-tokens", "8")
    wait_ready(gateway, orchestrator=1, worker=1)

    async with httpx.AsyncClient(headers=gateway.headers(), timeout=30) as http:
        card = await A2ACardResolver(http, gateway.url).get_agent_card()
        assert card.name == "edgecollab" and card.capabilities.streaming
        assert card.supported_interfaces[0].url == gateway.url + "/a2a"
        assert card.supported_interfaces[0].protocol_binding == "JSONRPC"
        skills = {s.id: s for s in card.skills}
        assert {"general", "health"} <= set(skills) and f"w-{uid}" in skills["health"].description
        assert "bearer" in card.security_schemes

        plain = await create_client(card, ClientConfig(httpx_client=http, streaming=False))
        [reply] = [event async for event in plain.send_message(ask("hello there"))]
        assert reply.HasField("message") and reply.message.role == Role.ROLE_AGENT
        assert len(reply.message.parts[0].text.split()) == 8
        provenance = reply.message.metadata["edgecollab"]
        assert provenance["outcome"] == "edge" and provenance["steps"][-1]["agent"] == f"w-{uid}"

        streaming = await create_client(card, ClientConfig(httpx_client=http, streaming=True))
        events = [event async for event in streaming.send_message(ask("tell me more"))]
        assert events[0].task.status.state == TaskState.TASK_STATE_WORKING
        pieces = [
            e.artifact_update.artifact.parts[0].text
            for e in events
            if e.HasField("artifact_update")
        ]
        assert len(pieces) >= 2 and len("".join(pieces).split()) == 8
        final = events[-1].status_update
        assert final.status.state == TaskState.TASK_STATE_COMPLETED
        assert final.metadata["edgecollab"]["outcome"] == "edge"
        with pytest.raises(TaskNotFoundError):  # tasks are not kept
            await plain.get_task(GetTaskRequest(id=events[0].task.id))

    async with httpx.AsyncClient(timeout=30) as stranger:  # the card is public, the rest is not
        assert (await stranger.get(gateway.url + "/.well-known/agent-card.json")).status_code == 200
        refused = await stranger.post(
            gateway.url + "/a2a",
            json={"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {}},
        )
        assert refused.status_code == 401
    async with httpx.AsyncClient(headers=gateway.headers(), timeout=30) as http:
        call = {"jsonrpc": "2.0", "id": 7, "method": "SendMessage", "params": {"message": {}}}
        bad = (await http.post(gateway.url + "/a2a", json=call)).json()
        assert bad["id"] == 7 and bad["error"]["code"] == -32602
        unknown = (await http.post(gateway.url + "/a2a", json=call | {"method": "Nope"})).json()
        assert unknown["error"]["code"] == -32601


async def test_a2a_without_an_orchestrator_is_a_failed_task_with_the_reason(spawn, uid, tmp_path):
    gateway = start_gateway(spawn, uid, tmp_path)
    wait_ready(gateway)
    async with httpx.AsyncClient(headers=gateway.headers(), timeout=30) as http:
        card = await A2ACardResolver(http, gateway.url).get_agent_card()
        for streaming in (False, True):
            client = await create_client(card, ClientConfig(httpx_client=http, streaming=streaming))
            events = [event async for event in client.send_message(ask("hello"))]
            status = (
                events[-1].task.status
                if events[-1].HasField("task")
                else (events[-1].status_update.status)
            )
            assert status.state == TaskState.TASK_STATE_FAILED
            assert "no orchestrator" in status.message.parts[0].text
