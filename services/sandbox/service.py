"""The sandboxed calculator peer: programs on knowledge/arithmetic/run, their printed result back.

It is the paper's `knowledge.gpt/arithmetic` made safe to offer on a bus: whatever the program
does, it runs confined (`runner.py`: no network, an unprivileged user, CPU, memory, file,
process and output limits, a wall clock). At most `concurrency` programs run at once; a request
waits for a slot until its deadline. A program over `max_program_bytes` is refused with an
Error (`too_large`), as is any malformed request (by the bus); the service keeps serving.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from schemas import ProgramResult, ProgramRun
from services.core.bus import Bus, Request
from services.core.errors import BadInput
from services.core.presence import Presence
from services.core.topics import ARITHMETIC
from services.sandbox.runner import Limits, Sandbox

log = structlog.get_logger("edgecollab.sandbox")


class SandboxPeer:
    """Serves ProgramRun requests from the `sandboxes` pool."""

    def __init__(
        self,
        *,
        bus: Bus,
        agent: str,
        sandbox: Sandbox,
        limits: Limits,
        concurrency: int = 2,
        max_program_bytes: int = 16384,
        presence: Presence | None = None,
    ) -> None:
        self.bus = bus
        self.agent = agent
        self.sandbox = sandbox
        self.limits = limits
        self.concurrency = concurrency
        self.max_program_bytes = max_program_bytes
        self.presence = presence
        self.active = 0
        self.waiting = 0
        self.runs = 0
        self._slots = asyncio.Semaphore(concurrency)
        bus.serve(ARITHMETIC, self.handle_run, shared="sandboxes")

    def load(self) -> tuple[int, int, float]:
        """(active, queued, 0.0) for the status."""
        return self.active, self.waiting, 0.0

    async def handle_run(self, request: Request[ProgramRun]) -> ProgramResult:
        run = request.body
        size = len(run.program.encode())
        if size > self.max_program_bytes:
            raise BadInput(
                "too_large", f"program of {size} bytes (at most {self.max_program_bytes})"
            )
        self.waiting += 1
        self._changed()
        try:
            async with asyncio.timeout(max(0.0, run.deadline - time.time())):
                await self._slots.acquire()
        except TimeoutError:
            raise BadInput("deadline", "no free sandbox slot before the deadline") from None
        finally:
            self.waiting -= 1
        self.active += 1
        self._changed()
        try:
            limits = self.limits.within(min(run.timeout_s, run.deadline - time.time()))
            outcome = await self.sandbox.run(run.program, limits)
        finally:
            self.active -= 1
            self._slots.release()
            self._changed()
        self.runs += 1
        log.info("program.ran", request_id=run.request_id, ok=outcome.ok, error=outcome.error,
                 ms=outcome.ms)  # fmt: skip
        return ProgramResult(
            request_id=run.request_id,
            agent=self.agent,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            exit_code=outcome.exit_code,
            timed_out=outcome.timed_out,
            truncated=outcome.truncated,
            error=outcome.error,
            ms=outcome.ms,
        )

    def _changed(self) -> None:
        if self.presence is not None:
            self.presence.changed()
