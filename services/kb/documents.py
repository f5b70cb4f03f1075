"""Documents for the knowledge base: plain text or markdown in, passages out (pure functions).

A document is UTF-8 text. Markdown headings (`#`, `##`, ...) start sections; a section's text
is cut at paragraphs (blank lines), then sentences, into passages of at most `MAX_CHARS`
characters, each keeping its section's title. Lines of the form `key: value` right under a
heading (or at the top of the document, for all its sections) describe it:

    source: World Health Organization, "WHO global air quality guidelines" (2021)
    cite: WHO 2021                       # the label answers cite it by (default: the source)
    stream: pm25                         # a data stream this section gives a range for
    range: <=15 µg/m³ (WHO 24-hour guideline)    # or `60-100 bpm (normal at rest)`, `>=7 h`

A `range` needs a `stream` of the registry (services/data/streams.py) and its unit; a document
without a `source` is cited by its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.data.streams import STREAMS

MAX_CHARS = 600  # a passage, at most (MiniLM reads 256 tokens; ~120 words fit well)
KEYS = ("source", "cite", "stream", "range")

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_META = re.compile(rf"^({'|'.join(KEYS)}):\s*(.+?)\s*$", re.IGNORECASE)
_NUM = r"-?\d+(?:\.\d+)?"
_RANGE = re.compile(
    rf"^(?:(?P<low>{_NUM})\s*(?:-|–|to)\s*(?P<high>{_NUM})|(?P<op><=|≤|>=|≥)\s*(?P<bound>{_NUM}))"
    r"\s*(?P<unit>\S+)(?:\s+\((?P<label>[^()]+)\))?$"
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class DocumentError(ValueError):
    """A document that cannot be indexed, with the reason in one line."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One passage of a document, before it has an id or a score."""

    title: str
    text: str
    source: str
    cite: str
    stream: str | None = None
    low: float | None = None
    high: float | None = None
    unit: str | None = None
    label: str | None = None

    @property
    def embedded(self) -> str:
        """What the embedder reads: the title, then the text."""
        return f"{self.title}. {self.text}"


def check_text(data: bytes, name: str) -> str:
    """The text of a file's bytes; DocumentError when it is empty, binary or not UTF-8."""
    if b"\x00" in data:
        raise DocumentError(f"{name} is not text (it holds NUL bytes: a binary file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DocumentError(f"{name} is not UTF-8 text") from None
    if not text.strip():
        raise DocumentError(f"{name} is empty")
    return text


def parse(name: str, text: str, *, source: str | None = None) -> list[Chunk]:
    """The passages of one document; `source` (say, given on the command line) is the source
    and the citation of all of them."""
    if "\x00" in text:
        raise DocumentError(f"{name} is not text (it holds NUL bytes)")
    defaults, sections = _sections(name, text)
    chunks = []
    for section in sections:
        meta = {**defaults, **section.meta}
        chunk_source = source or meta.get("source") or name
        cite = source or meta.get("cite") or chunk_source
        title = section.title or name
        reference = _reference(name, title, meta)
        chunks += [
            Chunk(title, piece, chunk_source, cite, *reference)
            for piece in _pieces(section.paragraphs)
        ]
    if not chunks:
        raise DocumentError(f"{name} has no text to index")
    return chunks


@dataclass
class _Section:
    title: str | None
    level: int  # of its heading; 0 before any heading
    meta: dict[str, str] = field(default_factory=dict)
    paragraphs: list[str] = field(default_factory=list)


def _sections(name: str, text: str) -> tuple[dict[str, str], list[_Section]]:
    """The document's own metadata (before any heading, or under a first `#` heading), and
    its sections with text, each titled (text before any heading: by the document's title)."""
    sections = [_Section(None, 0)]
    paragraph: list[str] = []
    in_meta = True  # right under a heading (or at the top): key: value lines describe it

    def flush() -> None:
        if paragraph:
            sections[-1].paragraphs.append(" ".join(paragraph))
            paragraph.clear()

    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        meta = _META.match(line) if in_meta else None
        if heading:
            flush()
            sections.append(_Section(heading.group(2), len(heading.group(1))))
            in_meta = True
        elif meta:
            sections[-1].meta[meta.group(1).lower()] = meta.group(2)
        elif line:
            in_meta = False
            paragraph.append(line)
        else:
            flush()
    flush()
    top, first = sections[0], sections[1] if len(sections) > 1 else None
    defaults = dict(top.meta)
    title = name
    if first is not None and first.level == 1:
        title = first.title or name
        if not top.paragraphs:
            defaults |= first.meta
            first.meta = {}
    for section in sections:
        section.title = section.title or title
    return defaults, [s for s in sections if s.paragraphs]


def _reference(
    name: str, title: str, meta: dict[str, str]
) -> tuple[str | None, float | None, float | None, str | None, str | None]:
    """(stream, low, high, unit, label) from a section's `stream` and `range`."""
    stream, written = meta.get("stream"), meta.get("range")
    known = next((s for s in STREAMS.values() if s.name == stream), None)
    if stream is not None and known is None:
        raise DocumentError(f"{name}, section {title!r}: unknown stream {stream!r}")
    if written is None:
        return stream, None, None, None, None
    if known is None:
        raise DocumentError(f"{name}, section {title!r}: a range needs a stream")
    match = _RANGE.match(written)
    if match is None:
        raise DocumentError(
            f"{name}, section {title!r}: range {written!r} is not 'LOW-HIGH UNIT' or '<=X UNIT'"
        )
    unit = match["unit"].strip()
    if not known.accepts_unit(unit):
        raise DocumentError(
            f"{name}, section {title!r}: {stream} is in {known.unit!r}, the range in {unit!r}"
        )
    low = float(match["low"]) if match["low"] else None
    high = float(match["high"]) if match["high"] else None
    if match["op"] in ("<=", "≤"):
        high = float(match["bound"])
    elif match["op"]:
        low = float(match["bound"])
    return stream, low, high, known.unit, match["label"]


def _pieces(paragraphs: list[str]) -> list[str]:
    """Paragraphs packed into pieces of at most MAX_CHARS (a longer one cut at sentences,
    a longer sentence at words)."""
    units: list[str] = []
    for paragraph in paragraphs:
        if len(paragraph) <= MAX_CHARS:
            units.append(paragraph)
            continue
        for sentence in _SENTENCE_END.split(paragraph):
            units += _words(sentence) if len(sentence) > MAX_CHARS else [sentence]
    pieces: list[str] = []
    for unit in units:
        if pieces and len(pieces[-1]) + 1 + len(unit) <= MAX_CHARS:
            pieces[-1] += " " + unit
        else:
            pieces.append(unit)
    return pieces


def _words(sentence: str) -> list[str]:
    pieces = [""]
    for word in sentence.split():
        word = word[:MAX_CHARS]
        if pieces[-1] and len(pieces[-1]) + 1 + len(word) > MAX_CHARS:
            pieces.append(word)
        else:
            pieces[-1] = f"{pieces[-1]} {word}".strip()
    return pieces
