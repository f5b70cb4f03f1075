"""Concurrent generation: requests share one model by batching their decode steps.

A `Generator` owns one decode thread. Each request gets a KV-cache slot; the thread feeds new
prompts in chunks and runs one decode step for every request that is generating, so requests
join and leave the batch as they start and finish. Results reach the event loop through
`OutputStream`s (async iterators of text pieces); onnxruntime runs outside the GIL, so the event
loop is never blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import structlog

from schemas import FinishReason, GenerationStats
from services.worker.chat import TextAssembler, render_prompt
from services.worker.engine import DecoderRunner, Engine
from services.worker.sampling import Sampler, SamplingParams

PREFILL_CHUNK = 256  # prompt tokens per step, so one long prompt does not stall the others

log = structlog.get_logger(__name__)


Item = (
    str | GenerationStats | BaseException
)  # what a stream carries: a piece, its end, or its failure


class OutputStream:
    """Async iterator of the text pieces of one request; `stats` is set once it ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        self.stats: GenerationStats | None = None
        self._loop = loop
        self._wake = wake  # tells the decode thread to look at this stream again
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._cancelled = False
        self._done = False

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, str):
            return item
        self._done = True
        if isinstance(item, GenerationStats):
            self.stats = item
            raise StopAsyncIteration
        raise item

    async def result(self) -> tuple[str, GenerationStats]:
        """The whole text and the stats, once the request ends."""
        text = "".join([piece async for piece in self])
        if self.stats is None:  # iterated elsewhere already, or ended by an error
            raise RuntimeError("the stream ended without stats")
        return text, self.stats

    def cancel(self) -> None:
        """Stop generating; the stream ends with finish_reason "cancelled"."""
        self._cancelled = True
        self._wake()


def _hand_over(items: list[tuple[OutputStream, Item]]) -> None:
    for stream, item in items:
        stream._queue.put_nowait(item)


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    deadline: float | None
    stream: OutputStream
    sampler: Sampler
    text: TextAssembler
    submitted: float = field(default_factory=time.perf_counter)
    slot: int = -1
    fed: int = 0  # prompt tokens in the cache
    generated: list[int] = field(default_factory=list)
    first_token_at: float = 0.0
    prefill_ms: float = 0.0

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.prompt)


class Generator:
    """Serves many requests on one engine with batched decoding in a background thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int,
        context: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.clock = clock  # read once per decode step, to end requests at their deadline
        self.context = min(context or engine.context_length, engine.context_length)
        self.runner = DecoderRunner(engine, slots=max_batch, capacity=self.context)
        self._slots: list[_Request | None] = [None] * max_batch
        self._waiting: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._outbox: list[tuple[OutputStream, Item]] = []  # for the event loop, sent once per step
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        """Requests in flight: generating or waiting for a slot."""
        return sum(r is not None for r in self._slots) + len(self._waiting)

    @property
    def queued(self) -> int:
        """Requests waiting for a free slot."""
        return len(self._waiting)

    def submit(
        self,
        messages: list[dict] | str,
        params: SamplingParams,
        *,
        deadline: float | None = None,
        prefix: str = "",
    ) -> OutputStream:
        """Start a request; `deadline` is an instant of `clock` (time.time() by default);
        `prefix` is the start of the reply, already written, to continue.
        Raises ValueError on bad input."""
        if self._closed:
            raise RuntimeError("generator is closed")
        prompt = self.engine.encode_prompt(render_prompt(self.engine.card, messages) + prefix)
        if len(prompt) >= self.context:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context holds {self.context}")
        if params.max_tokens > self.context:
            raise ValueError(f"max_tokens must be between 1 and the context length {self.context}")
        stream = OutputStream(asyncio.get_running_loop(), self._notify)
        request = _Request(
            prompt,
            params,
            deadline,
            stream,
            Sampler(params, self.runner.vocab, prompt),
            TextAssembler(self.engine.tokenizer, params.stop),
        )
        with self._cond:
            self._waiting.append(request)
            self._cond.notify()
        return stream

    async def close(self) -> None:
        """Stop the decode thread; requests still in flight end as cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        while self._next_batch():
            try:
                self._step()
            except Exception as exc:  # a failed run fails its requests, not the worker
                log.exception("decode_step_failed")
                for request in [r for r in self._slots if r is not None]:
                    self._release(request)
                    self._outbox.append((request.stream, exc))
            self._deliver()
        for request in [*(r for r in self._slots if r is not None), *self._waiting]:
            self._finish(request, "cancelled")
        self._deliver()

    def _deliver(self) -> None:
        """Hand this step's pieces to the event loop at once: each wake-up of the loop takes
        a core from the decode threads for a moment."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, Item]]] = {}
        for stream, item in self._outbox:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        self._outbox = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody left to tell
                loop.call_soon_threadsafe(_hand_over, items)

    def _next_batch(self) -> bool:
        """Wait for work, admit waiting requests to free slots; False once closed."""
        with self._cond:
            while not self._closed and not self._waiting and not any(self._slots):
                self._cond.wait()
            while self._waiting and None in self._slots:
                request = self._waiting.popleft()
                request.slot = self._slots.index(None)
                self._slots[request.slot] = request
            return not self._closed

    def _step(self) -> None:
        now = self.clock()
        with self._cond:
            requests = [r for r in (*self._slots, *self._waiting) if r is not None]
        for request in requests:
            if request.stream._cancelled:
                self._finish(request, "cancelled")
            elif request.deadline is not None and now >= request.deadline:
                self._finish(request, "deadline")
        feeding = next((r for r in self._slots if r is not None and not r.decoding), None)
        if feeding is not None:
            self._prefill(feeding)
            self._deliver()  # a first token goes out before the others' decode step
        if any(r is not None and r.decoding and r.generated for r in self._slots):
            self._decode()

    def _prefill(self, request: _Request) -> None:
        started = time.perf_counter()
        chunk = request.prompt[request.fed : request.fed + PREFILL_CHUNK]
        logits = self.runner.prefill(request.slot, np.array(chunk), request.fed)
        request.fed += len(chunk)
        request.prefill_ms += (time.perf_counter() - started) * 1e3
        if request.decoding:
            self._accept(request, request.sampler(logits))

    def _decode(self) -> None:
        rows = 1 + max(
            i for i, r in enumerate(self._slots) if r is not None and r.decoding and r.generated
        )
        tokens = np.zeros(rows, np.int64)
        lengths = np.zeros(rows, np.int32)
        live = []
        for i, r in enumerate(self._slots[:rows]):
            if r is None:
                continue
            # A slot still being prefilled rides along writing at its next position, which its
            # next chunk overwrites; free slots write position 0 of their own unused row.
            lengths[i] = r.fed + max(len(r.generated) - 1, 0)
            if r.decoding and r.generated:
                tokens[i] = r.generated[-1]
                live.append(r)
        logits = self.runner.decode(tokens, lengths)
        for r in live:
            self._accept(r, r.sampler(logits[r.slot]))

    def _accept(self, request: _Request, token: int) -> None:
        if not request.generated:
            request.first_token_at = time.perf_counter()
        request.generated.append(token)
        if token in self.engine.stop_ids and not request.params.ignore_eos:
            return self._finish(request, "stop")
        piece = request.text.push(token)
        if piece:
            self._outbox.append((request.stream, piece))
        if request.text.stopped:
            self._finish(request, "stop")
        elif len(request.generated) >= min(
            request.params.max_tokens, self.context - len(request.prompt)
        ):
            self._finish(request, "length")

    def _finish(self, request: _Request, reason: FinishReason) -> None:
        self._release(request)
        tail = request.text.flush()
        if tail:
            self._outbox.append((request.stream, tail))
        self._outbox.append((request.stream, _stats(request, reason)))

    def _release(self, request: _Request) -> None:
        with self._cond:
            if request.slot >= 0 and self._slots[request.slot] is request:
                self._slots[request.slot] = None
                self.runner.release(request.slot)
            with contextlib.suppress(ValueError):
                self._waiting.remove(request)


def _stats(request: _Request, reason: FinishReason) -> GenerationStats:
    now = time.perf_counter()
    produced = len(request.generated)
    ttft = (request.first_token_at - request.submitted) * 1e3 if produced else 0.0
    decode_s = now - request.first_token_at if produced > 1 else 0.0
    return GenerationStats(
        prompt_tokens=len(request.prompt),
        output_tokens=produced,
        prefill_ms=round(request.prefill_ms, 2),
        ttft_ms=round(ttft, 2),
        decode_tok_s=round((produced - 1) / decode_s, 2) if decode_s > 0 else 0.0,
        finish_reason=reason,
        confidence=request.sampler.signal.confidence,
        entropy=request.sampler.signal.entropy,
    )
