"""What the Classifier Engine accepts as a query (light: no model imports)."""

from __future__ import annotations

MAX_QUERY_CHARS = 8000  # as schemas.ClassifyRequest.text


class ClassifierInputError(ValueError):
    """A text the engine refuses: not a string, blank, or longer than MAX_QUERY_CHARS."""


def check_text(text: object) -> str:
    """The text itself, or ClassifierInputError saying what is wrong with it."""
    if not isinstance(text, str):
        raise ClassifierInputError(f"text must be a string, not {type(text).__name__}")
    if not text.strip():
        raise ClassifierInputError("text is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise ClassifierInputError(f"text has {len(text)} characters, more than {MAX_QUERY_CHARS}")
    return text
