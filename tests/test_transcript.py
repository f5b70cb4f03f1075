"""A stream followed across the workers that wrote it: each piece once, in order."""

from __future__ import annotations

from schemas import Resume, TokenChunk
from services.core.transcript import Transcript


def chunk(seq: int, text: str, attempt: int = 1) -> TokenChunk:
    return TokenChunk(request_id="r1", agent=f"w{attempt}", seq=seq, text=text, attempt=attempt)


def test_pieces_are_taken_once_and_in_order():
    t = Transcript()
    assert [t.add(c) for c in (chunk(0, "a"), chunk(0, "a"), chunk(2, "c"), chunk(1, "b"))] == [
        "a", None, None, "b",
    ]  # fmt: skip
    assert t.text == "ab" and t.resume() == Resume(text="ab", seq=2, attempt=1)


def test_a_later_attempt_continues_and_silences_the_earlier():
    t = Transcript()
    t.add(chunk(0, "one "))
    t.add(chunk(1, "two ", attempt=2))  # the second worker took over after one chunk
    assert t.add(chunk(1, "TWO ")) is None  # the first woke up again: not heard
    assert t.add(chunk(2, "three", attempt=2)) == "three"
    assert t.text == "one two three" and t.attempt == 2


def test_a_superseded_attempt_is_not_heard_before_its_successor_speaks():
    t = Transcript()
    t.add(chunk(0, "x"))
    t.supersede(3)
    assert t.add(chunk(1, "y")) is None and t.add(chunk(1, "z", attempt=3)) == "z"


def test_the_rest_of_an_answer_is_what_was_not_streamed():
    t = Transcript()
    assert t.rest("whole answer") == "whole answer" and t.resume() is None
    t.add(chunk(0, "whole "))
    assert t.rest("whole answer") == "answer"
    assert t.rest("something else") == ""  # differs from what was shown: nothing to add


def test_a_transcript_goes_on_from_a_resume():
    t = Transcript(Resume(text="one ", seq=1, attempt=2))
    assert t.add(chunk(0, "one ", attempt=3)) is None and t.add(chunk(1, "two", attempt=1)) is None
    assert t.add(chunk(1, "two", attempt=3)) == "two" and t.text == "one two"


def test_a_query_sent_again_hears_only_the_next_orchestrators_workers():
    t = Transcript()
    t.add(chunk(0, "a "))
    resume = t.hand_over()
    assert resume == Resume(text="a ", seq=1, attempt=1)
    assert t.add(chunk(1, "late")) is None  # the first orchestrator's worker, still writing
    assert t.add(chunk(1, "b", attempt=2)) == "b"
