"""A local OpenAI-compatible chat-completions server standing in for the paid API (stdlib,
in a thread), for tests and benchmarks.

    with FakeCloud(reply="hi", usage=(12, 3), faults=["429", "garbage"]) as cloud:
        settings = CloudSettings(base_url=cloud.url, api_key=SecretStr(cloud.api_key))

Without `usage`, prompt tokens are the words of the messages and, with `echo_max_tokens`, the
reply has exactly `max_tokens` words (as a model that always writes to its limit), or N when a
message holds the word `eos@N` with N below it (as the emulated worker does). `latency`
= (ttft_s, tokens_per_s) makes each answer take ttft + output / rate, like a real endpoint.

Each request consumes one fault from `faults` (a deque tests may refill), then gets the normal
reply. Faults: "429" (with Retry-After: 0), any other 3-digit status, "garbage" (200 with a
body that is not JSON), "partial" (200, JSON without usage), "delay:<s>" (sleep, then reply
normally), "hang" (no answer at all while the server runs: only the client's timeout ends it),
"drop" (close the connection without an answer). With `api_key` None it takes requests
without a key. `requests` records each request's headers and
JSON body.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from services.worker.emulated import planned_tokens


class FakeCloud:
    """The server; a context manager that starts and stops it."""

    def __init__(
        self,
        *,
        reply: str = "a cloud answer",
        usage: tuple[int, int] | None = None,
        faults: Iterable[str] = (),
        api_key: str | None = "sk-test-0123456789",
        echo_max_tokens: bool = False,
        latency: tuple[float, float] | None = None,
    ) -> None:
        self.reply, self.usage, self.api_key = reply, usage, api_key
        self.echo_max_tokens, self.latency = echo_max_tokens, latency
        self.faults: deque[str] = deque(faults)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()  # lets "hang" faults go when the server stops
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL, like https://api.openai.com/v1."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def take(self, headers: dict[str, str], body: dict[str, Any]) -> str | None:
        """Record a request; the fault to play for it, if any."""
        with self._lock:
            self.requests.append({"headers": headers, "body": body})
            return self.faults.popleft() if self.faults else None

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """The normal answer to `body`."""
        words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        reply = self.reply
        if self.echo_max_tokens:
            text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
            reply = " ".join(["token"] * planned_tokens(text, int(body.get("max_tokens") or 1)))
        prompt, output = self.usage or (words, len(reply.split()))
        if self.latency is not None:
            ttft_s, tokens_per_s = self.latency
            time.sleep(ttft_s + output / tokens_per_s)
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": output,
                "total_tokens": prompt + output,
            },
        }


def _handler(cloud: FakeCloud) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                body = {}
            fault = cloud.take(dict(self.headers), body)
            if not self.path.endswith("/chat/completions"):
                self._send(404, b'{"error": {"message": "not found"}}')
            elif cloud.api_key and self.headers.get("authorization") != f"Bearer {cloud.api_key}":
                self._send(401, b'{"error": {"message": "bad api key"}}')
            else:
                self._play(fault, body)

        def _play(self, fault: str | None, body: dict[str, Any]) -> None:
            if fault == "hang":
                cloud._closing.wait()
                return
            if fault and fault.startswith("delay:"):
                time.sleep(float(fault.split(":", 1)[1]))
                fault = None
            if fault is None:
                self._send(200, json.dumps(cloud.completion(body)).encode())
            elif fault == "drop":
                self.close_connection = True
                self.connection.close()
            elif fault == "garbage":
                self._send(200, b"<html>upstream proxy error</html>")
            elif fault == "partial":
                self._send(200, b'{"choices": [{"message": {"content": "x"}}]}')
            else:
                extra = {"Retry-After": "0"} if fault == "429" else {}
                self._send(int(fault), b'{"error": {"message": "injected"}}', extra)

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # the client gave up (a delay fault outlived its timeout)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
