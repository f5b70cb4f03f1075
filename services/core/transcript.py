"""A streamed answer as its requester sees it, across the workers that wrote it.

A worker that fails mid-stream is replaced by one that continues the text (Task.resume): its
chunks carry a higher `attempt` and go on from the next sequence number. Whoever follows a
stream keeps a Transcript, so every piece is shown once, in order, and a superseded worker
that wakes up again is not heard. A query sent again to another orchestrator carries its
client's Transcript as a Resume, so the new orchestrator continues the stream too.
"""

from __future__ import annotations

from schemas import Resume, TokenChunk


class Transcript:
    def __init__(self, resume: Resume | None = None) -> None:
        self.text = resume.text if resume else ""
        self.seq = resume.seq if resume else 0  # the next chunk's
        self.attempt = resume.attempt if resume else 1  # the attempt now heard

    def add(self, chunk: TokenChunk) -> str | None:
        """The chunk's text if it continues the stream; None for a repeat, a gap or a chunk
        of a superseded attempt (what a gap loses comes with the answer: `rest`)."""
        if chunk.attempt < self.attempt or chunk.seq != self.seq:
            return None
        self.attempt = chunk.attempt
        self.text += chunk.text
        self.seq += 1
        return chunk.text

    def supersede(self, attempt: int) -> None:
        """From now on only chunks of `attempt` or later count."""
        self.attempt = max(self.attempt, attempt)

    def resume(self) -> Resume | None:
        """Where the next worker takes over (None: nothing was sent yet, start afresh)."""
        return Resume(text=self.text, seq=self.seq, attempt=self.attempt) if self.seq else None

    def hand_over(self) -> Resume:
        """For a query sent again: what was shown, and from now on only chunks of the next
        orchestrator's attempts count (the last one's worker may still be writing)."""
        resume = Resume(text=self.text, seq=self.seq, attempt=self.attempt)
        self.attempt += 1
        return resume

    def rest(self, answer: str) -> str:
        """What the final answer says beyond what was streamed (all of it when nothing was)."""
        if answer.startswith(self.text):
            return answer[len(self.text) :]
        return "" if self.text else answer  # a lost piece or trailing blanks: nothing to add
