"""The emulated backend: a device of a given token rate and concurrency that sleeps per token.

It stands for a Jetson-class device in experiments with many devices on one box. With k
requests in flight it decodes `tokens_per_s * k**beta` tokens/s in total, shared equally: the
same node model as the simulator, so live runs and simulations agree.

Where a real model ends its answer by itself (EOS), an emulated one ends it where its prompt
says: a word `eos@N` in the prompt makes it write min(N, max_tokens) tokens (finish reason
`stop` below the cap); without one it writes to max_tokens. Benchmarks put a trace's true
lengths there; the orchestrator never reads them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

from schemas import FinishReason, GenerationStats, SamplingOptions, Task

_WORDS = ("edge", "models", "cooperate", "over", "the", "bus", "and", "answer", "fast", "locally")
_TICK_S = 0.02  # granularity of the emulated decode loop
_TIMER_S = 0.001  # epoll's resolution: a shorter asyncio.sleep still waits this long
_EOS = re.compile(r"(?<!\S)eos@(\d{1,6})(?!\S)")


def planned_tokens(prompt: str, max_tokens: int) -> int:
    """How many tokens an emulated model writes for `prompt`: its `eos@N`, capped."""
    found = _EOS.search(prompt)
    return min(int(found.group(1)), max_tokens) if found else max_tokens


def eos_word(tokens: int) -> str:
    """The prompt word that makes an emulated model (or the fake cloud) stop after `tokens`."""
    return f"eos@{tokens}"


class EmulatedBackend:
    """Sleeps instead of computing; labelled `emulated` in the agent's card."""

    kind = "emulated"
    model = None

    def __init__(self, *, tokens_per_s: float, concurrency: int, beta: float = 0.5) -> None:
        self.tokens_per_s = tokens_per_s
        self.concurrency = concurrency
        self.beta = beta
        self.active = 0

    @property
    def queued(self) -> int:
        """None: every accepted request decodes at once (processor sharing)."""
        return 0

    def stream_rate(self) -> float:
        """Tokens/s of each stream now (processor sharing among `active`)."""
        return self.tokens_per_s * max(1, self.active) ** (self.beta - 1)

    async def generate(
        self,
        task: Task,
        sampling: SamplingOptions,
        emit: Callable[[str], Awaitable[None]] | None,
    ) -> tuple[str, GenerationStats]:
        started = time.perf_counter()
        written = len(task.resume.text.split()) if task.resume is not None else 0  # a word a token
        self.active += 1
        try:
            produced, reason = await self._decode(task, emit, written)
        finally:
            self.active -= 1
        seconds = time.perf_counter() - started
        stats = GenerationStats(
            prompt_tokens=len(task.prompt.split()),
            output_tokens=produced,
            prefill_ms=0.0,
            decode_tok_s=produced / seconds if seconds > 0 else 0.0,
            finish_reason=reason,
        )
        return _text(produced, offset=written), stats

    async def _decode(
        self, task: Task, emit: Callable[[str], Awaitable[None]] | None, written: int
    ) -> tuple[int, FinishReason]:
        """Tokens accrue with elapsed time at the stream rate of the moment, so a late wake-up
        (a busy machine) delays a chunk but never slows the emulated device down. A wait
        shorter than the loop's timers can time is counted as waited, not slept. A resumed
        answer continues after the `written` tokens it was sent with. Returns the new tokens."""
        target = planned_tokens(task.prompt, task.max_tokens)
        progress, emitted = float(written), written
        last = time.monotonic()
        while emitted < target:
            if time.time() >= task.deadline:
                return emitted - written, "deadline"
            rate = self.stream_rate()
            wait = min(_TICK_S, (target - progress) / rate)
            if wait >= _TIMER_S:
                await asyncio.sleep(wait)
            now = time.monotonic()
            progress = min(float(target), progress + rate * max(now - last, wait))
            last = now
            ready = int(progress + 1e-9) - emitted
            if ready > 0 and emit is not None:
                await emit(_text(ready, offset=emitted) + " ")
            emitted += ready
        return emitted - written, "stop" if target < task.max_tokens else "length"

    async def close(self) -> None:
        """Nothing to release."""


def _text(count: int, offset: int = 0) -> str:
    return " ".join(_WORDS[(offset + i) % len(_WORDS)] for i in range(count))
