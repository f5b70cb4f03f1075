"""What a worker backend is: something that turns a Task into text, token by token."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from schemas import GenerationStats, ModelInfo, SamplingOptions, Task


class Backend(Protocol):
    kind: str  # "onnx" or "emulated", shown in the agent's card
    tokens_per_s: float  # batch-1 decode rate
    concurrency: int  # requests served at once; one more is rejected

    @property
    def model(self) -> ModelInfo | None:
        """The language model (None: an emulated device)."""
        ...

    @property
    def queued(self) -> int:
        """Requests accepted but waiting for a decode slot (shown in the agent's status)."""
        ...

    async def generate(
        self,
        task: Task,
        sampling: SamplingOptions,
        emit: Callable[[str], Awaitable[None]] | None,
    ) -> tuple[str, GenerationStats]:
        """Generate for `task` with `sampling` (resolved); stream text pieces to `emit`."""
        ...

    async def close(self) -> None: ...
