"""The onnx backend: a real SLM on onnxruntime, requests batched by the Generator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from schemas import GenerationStats, ModelInfo, SamplingOptions, Task
from services.core.errors import BadInput
from services.worker.engine import Engine, measure_tokens_per_s
from services.worker.generator import Generator
from services.worker.sampling import SamplingParams


class OnnxBackend:
    """Serves up to `concurrency` requests at once from one model folder."""

    kind = "onnx"

    def __init__(self, engine: Engine, *, concurrency: int, version: str | None = None) -> None:
        self.engine = engine
        self.concurrency = concurrency
        self.tokens_per_s = round(measure_tokens_per_s(engine), 1)  # measured here, at start
        card = engine.card
        self.model = ModelInfo(
            name=card["name"],
            architecture=card.get("architecture"),
            parameters=card.get("parameters"),
            quantization=card.get("quantization"),
            context_length=card.get("context_length"),
            version=version or card.get("version"),
        )
        self._generator: Generator | None = None

    @property
    def queued(self) -> int:
        return self._generator.queued if self._generator is not None else 0

    async def generate(
        self,
        task: Task,
        sampling: SamplingOptions,
        emit: Callable[[str], Awaitable[None]] | None,
    ) -> tuple[str, GenerationStats]:
        if self._generator is None:  # made on the event loop that serves the requests
            self._generator = Generator(self.engine, max_batch=self.concurrency)
        messages = [{"role": "system", "content": task.system}] if task.system else []
        messages.append({"role": "user", "content": task.prompt})
        prefix = task.resume.text if task.resume is not None else ""  # continued, not redone
        written = len(self.engine.tokenizer.encode(prefix, add_special_tokens=False).ids)
        try:
            params = SamplingParams.resolve(sampling, max_tokens=max(1, task.max_tokens - written))
            stream = self._generator.submit(messages, params, deadline=task.deadline, prefix=prefix)
        except ValueError as exc:
            raise BadInput("bad_request", str(exc)) from None
        pieces = []
        try:
            async for piece in stream:
                pieces.append(piece)
                if emit is not None:
                    await emit(piece)
        finally:
            if stream.stats is None:  # we were cancelled: free the slot
                stream.cancel()
        assert stream.stats is not None
        return "".join(pieces), stream.stats

    async def close(self) -> None:
        if self._generator is not None:
            await self._generator.close()
