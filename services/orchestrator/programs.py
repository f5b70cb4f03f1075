"""Math by program: the code expert writes a program, the sandboxed calculator peer runs it.

A plan's `program` step asks the expert domain's pool (knowledge/<domain>/ask; when no expert
is online, any worker through the dispatcher) for a Python program that prints the answer, takes
the program from the reply's fenced code block, sends it to knowledge/arithmetic/run and returns
what it printed (its last non-empty line). A reply without a program, no sandbox, an error, a
timeout, a non-zero exit or no output fail the step; the plan's fallback, a plain generation,
answers instead. Provenance: the `program` step (who wrote it, the program) and the `sandbox`
step (who ran it, what it printed or why it failed).
"""

from __future__ import annotations

import textwrap
import time

from schemas import ProgramResult, ProgramRun, Query, SamplingOptions, Step
from services.core.bus import Bus
from services.core.errors import EdgecollabError
from services.core.topics import ARITHMETIC
from services.orchestrator.cooperation import Cooperation
from services.orchestrator.dispatch import Dispatcher, Job
from services.orchestrator.planner import PlanStep, render
from services.orchestrator.provenance import record

# Code wants its identifiers repeated: no repetition penalty, greedy.
PROGRAM_SAMPLING = SamplingOptions(temperature=0.0, repetition_penalty=1.0)
RUN_TIMEOUT_S = 5.0  # wall clock for one program (the peer caps it too)
_TRANSFER_S = 5.0  # the run's deadline: its timeout plus this, for start-up and the bus
PYTHON_TAGS = ("", "python", "python3", "py")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """The fenced blocks of a Markdown reply as (language tag, body); an unclosed last block
    counts (the generation may have stopped inside it)."""
    blocks: list[tuple[str, str]] = []
    tag: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        fence = line.strip().startswith("```")
        if tag is None and fence:
            tag, lines = line.strip()[3:].strip().lower(), []
        elif fence:
            blocks.append((tag or "", "\n".join(lines)))
            tag = None
        elif tag is not None:
            lines.append(line)
    if tag is not None:
        blocks.append((tag, "\n".join(lines)))
    return blocks


def extract_program(text: str) -> str | None:
    """The first non-empty Python (or untagged) fenced block of `text`, dedented; else None."""
    for tag, body in code_blocks(text):
        if tag in PYTHON_TAGS and body.strip():
            return textwrap.dedent(body).strip("\n") + "\n"
    return None


def printed_answer(stdout: str) -> str | None:
    """What a program's output answers: its last non-empty line."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    return lines[-1] if lines else None


class Programs:
    """Runs `program` steps: write (expert or any worker), extract, run on a sandbox."""

    def __init__(
        self,
        *,
        bus: Bus,
        dispatcher: Dispatcher,
        cooperation: Cooperation,
        timeout_s: float = RUN_TIMEOUT_S,
    ) -> None:
        self.bus = bus
        self.dispatcher = dispatcher
        self.cooperation = cooperation
        self.timeout_s = timeout_s

    async def run(self, step: PlanStep, query: Query) -> tuple[str | None, list[Step]]:
        """The printed answer (None when there is none) and the steps' records."""
        # Half of the time left is kept for the fallback, should it be needed.
        write_by = time.time() + (query.deadline - time.time()) / 2
        reply, records = await self._write(step, query, write_by)
        if reply is None:
            return None, records
        program = extract_program(reply)
        last = records[-1]
        if program is None:
            detail = "the reply held no ```python code block"
            records[-1] = last.model_copy(update={"outcome": "failed", "detail": detail})
            return None, records
        records[-1] = last.model_copy(update={"program": program})
        answer, ran = await self._execute(query, program)
        return answer, [*records, ran]

    async def _write(
        self, step: PlanStep, query: Query, deadline: float
    ) -> tuple[str | None, list[Step]]:
        prompt = render(step, query.text, {})
        if step.domain is not None:  # the expert pool of that domain
            text, asked = await self.cooperation.ask(
                step, prompt, request_id=query.request_id, deadline=deadline,
                sampling=PROGRAM_SAMPLING,
            )  # fmt: skip
            return text, [asked]
        job = Job(
            request_id=query.request_id,
            name=step.name,
            prompt=prompt,
            max_tokens=step.max_tokens,
            deadline=deadline,
            sampling=PROGRAM_SAMPLING,
        )
        generated = await self.dispatcher.run(job)
        return generated.text, generated.steps

    async def _execute(self, query: Query, program: str) -> tuple[str | None, Step]:
        topic = ARITHMETIC.format()
        left = query.deadline - time.time()
        timeout_s = max(0.5, min(self.timeout_s, left / 4))
        run = ProgramRun(
            request_id=f"{query.request_id}.program",
            program=program,
            timeout_s=timeout_s,
            deadline=min(query.deadline, time.time() + timeout_s + _TRANSFER_S),
        )
        started = time.perf_counter()
        try:
            reply = await self.bus.request(topic, run, deadline=run.deadline)
        except EdgecollabError as exc:  # no sandbox, refused, too late
            return None, record("sandbox", topic, None, started, "failed", detail=str(exc))
        assert isinstance(reply, ProgramResult)
        answer = printed_answer(reply.stdout) if reply.ok else None
        if answer is None:
            why = reply.error or "it printed nothing"
            return None, record("sandbox", topic, reply.agent, started, "failed", detail=why)
        detail = f"exit 0 in {reply.ms:.0f} ms; printed: {reply.stdout.strip()[:500]}"
        return answer, record("sandbox", topic, reply.agent, started, "ok", detail=detail)
