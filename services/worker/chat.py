"""Prompts from chat messages (the card's chat format) and streamed text with stop strings."""

from __future__ import annotations

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

ROLES = ("system", "user", "assistant")


def render_prompt(card: dict, messages: list[dict] | str) -> str:
    """The prompt text for `messages` (a bare string is one user message), ready for the reply."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    _check(messages)
    fmt = card.get("chat_format", "plain")
    if fmt == "chatml":
        return _chatml(messages, card.get("default_system_prompt"))
    if fmt == "jinja":
        return _jinja(card, messages)
    return "\n".join(m["content"] for m in messages) + "\n"


def _check(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("empty prompt: no messages")
    for m in messages:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"each message needs a role in {ROLES} and a string content")
    if not any(m["content"].strip() for m in messages if m["role"] != "system"):
        raise ValueError("empty prompt")


def _chatml(messages: list[dict], default_system: str | None) -> str:
    if default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _jinja(card: dict, messages: list[dict]) -> str:
    # A model's own template, as transformers renders it (sandboxed: the card is data).
    template = ImmutableSandboxedEnvironment().from_string(card["chat_template"])
    return template.render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
    )


class TextAssembler:
    """Turns generated token ids into text pieces: whole UTF-8 characters, cut at stop strings.

    Text that could be the start of a stop string is held back until it is clear it is not.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Text ready to emit after `token`; sets `stopped` when a stop string appears."""
        piece = self.decoder.step(self.tokenizer, token)
        if piece is None or self.stopped:
            return ""
        self.pending += piece
        for s in self.stop:
            at = self.pending.find(s)
            if at >= 0:
                self.stopped = True
                self.pending = self.pending[:at]
        if self.stopped:
            return self.flush()
        keep = _held_back(self.pending, self.stop)
        ready, self.pending = (
            self.pending[: len(self.pending) - keep],
            self.pending[len(self.pending) - keep :],
        )
        return ready

    def flush(self) -> str:
        """Whatever is still held back (at the end of the generation)."""
        text, self.pending = self.pending, ""
        return text


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
