"""The knowledge base's index: passages and their unit vectors, searched by cosine similarity,
kept in one file (`index.npz`, written whole and renamed into place, so a crash leaves the old
one or the new one, never half of either).

A document is known by (domain, name): adding a document of a name already there replaces it.
The index remembers which embedder made its vectors; opened with another one it is empty, and
the service re-embeds the documents it holds (they are kept as text).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import structlog

from schemas import Passage
from services.kb.documents import Chunk

log = structlog.get_logger("edgecollab.kb")

FILE = "index.npz"


@dataclass(frozen=True, slots=True)
class Document:
    """One document of a domain, as its chunks (the text kept, so it can be re-embedded)."""

    domain: str
    name: str
    chunks: tuple[Chunk, ...]
    sha256: str
    added_at: float

    @classmethod
    def of(cls, domain: str, name: str, text: str, chunks: list[Chunk]) -> Document:
        digest = hashlib.sha256(text.encode()).hexdigest()
        return cls(domain, name, tuple(chunks), digest, time.time())

    def summary(self) -> dict[str, object]:
        """What the catalogue says of it."""
        sources = list(dict.fromkeys(c.source for c in self.chunks))
        return {"domain": self.domain, "name": self.name, "passages": len(self.chunks),
                "sources": sources, "sha256": self.sha256, "added_at": self.added_at}  # fmt: skip


class Index:
    """Documents per domain and one vector per chunk (rows in document order)."""

    def __init__(self, model: str, dims: int) -> None:
        self.model = model
        self.dims = dims
        self.documents: dict[tuple[str, str], Document] = {}
        self._vectors: dict[tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return sum(len(d.chunks) for d in self.documents.values())

    def put(self, document: Document, vectors: np.ndarray) -> None:
        """Add or replace a document with its chunks' vectors."""
        assert vectors.shape == (len(document.chunks), self.dims), vectors.shape
        key = (document.domain, document.name)
        self.documents[key] = document
        self._vectors[key] = vectors.astype(np.float32)

    def has(self, domain: str, name: str, sha256: str) -> bool:
        known = self.documents.get((domain, name))
        return known is not None and known.sha256 == sha256

    def search(
        self,
        domain: str,
        vector: np.ndarray,
        *,
        k: int,
        min_score: float = 0.0,
        streams: tuple[str, ...] = (),
    ) -> list[Passage]:
        """The `k` passages of `domain` nearest `vector` (at least `min_score`), then for each
        of `streams` its nearest reference passage not already among them."""
        rows = [
            (doc, n, chunk)
            for key, doc in self.documents.items()
            if key[0] == domain
            for n, chunk in enumerate(doc.chunks)
        ]
        if not rows:
            return []
        matrix = np.concatenate([self._vectors[(domain, d.name)] for d in self._docs(domain)])
        scores = matrix @ vector.astype(np.float32)
        order = np.argsort(-scores, kind="stable")
        found = [
            _passage(rows[i], float(scores[i]), "text") for i in order[:k] if scores[i] >= min_score
        ]
        taken = {p.id for p in found}
        for stream in dict.fromkeys(streams):
            best = next((i for i in order if rows[i][2].stream == stream and rows[i][2].unit), None)
            if best is None:
                continue
            passage = _passage(rows[best], float(scores[best]), "stream")
            if passage.id not in taken:
                found.append(passage)
                taken.add(passage.id)
        return found

    def _docs(self, domain: str) -> list[Document]:
        return [d for key, d in self.documents.items() if key[0] == domain]

    # -- the file ----------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": self.model,
            "dims": self.dims,
            "documents": [
                {**asdict(d), "chunks": [asdict(c) for c in d.chunks]}
                for d in self.documents.values()
            ],
        }
        vectors = [self._vectors[key] for key in self.documents]
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, self.dims), np.float32)
        temporary = folder / f".{FILE}.{os.getpid()}.tmp"
        with temporary.open("wb") as out:
            np.savez(out, vectors=matrix, meta=np.array(json.dumps(meta)))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, folder / FILE)

    @classmethod
    def load(cls, folder: Path, model: str, dims: int) -> tuple[Index, list[Document]]:
        """The index kept in `folder` for this embedder, and the documents kept there that
        must be embedded again (another embedder made their vectors). A missing file is an
        empty index; an unreadable one is set aside (renamed `.bad`) and logged."""
        index, path = cls(model, dims), folder / FILE
        if not path.exists():
            return index, []
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                matrix = stored["vectors"]
            documents = [_document(d) for d in meta["documents"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("kb.index_unreadable", path=str(path), error=str(exc))
            with contextlib.suppress(OSError):
                os.replace(path, path.with_suffix(".npz.bad"))
            return index, []
        if meta.get("model") != model or meta.get("dims") != dims:
            log.warning("kb.index_other_model", model=meta.get("model"), now=model)
            return index, documents
        start = 0
        for document in documents:
            end = start + len(document.chunks)
            index.put(document, matrix[start:end])
            start = end
        return index, []


def _document(raw: dict[str, object]) -> Document:
    chunks = tuple(Chunk(**c) for c in raw["chunks"])  # type: ignore[attr-defined]
    return Document(
        domain=str(raw["domain"]),
        name=str(raw["name"]),
        chunks=chunks,
        sha256=str(raw["sha256"]),
        added_at=float(raw["added_at"]),  # type: ignore[arg-type]
    )


def _passage(row: tuple[Document, int, Chunk], score: float, matched: str) -> Passage:
    document, n, chunk = row
    return Passage(
        id=f"{document.domain}/{document.name}#{n}",
        domain=document.domain,
        document=document.name,
        title=chunk.title,
        text=chunk.text,
        source=chunk.source,
        cite=chunk.cite,
        score=round(score, 4),
        matched=matched,  # type: ignore[arg-type]
        stream=chunk.stream,
        low=chunk.low,
        high=chunk.high,
        unit=chunk.unit,
        label=chunk.label,
    )
