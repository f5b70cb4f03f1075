"""The knowledge-base peer: a domain's passages nearest a text, and documents added to it.

It serves, for each domain it holds, `knowledge/<domain>/retrieve` (knowledge bases of a domain
share it: one of them answers) and `knowledge/<domain>/documents` (every one of them adds the
document). Passages are ranked by the cosine similarity of MiniLM embeddings, made by the site's
embedder on computation/embed (the Classifier Engine's model: services/core/embeddings.py), so
the knowledge base holds no model of its own; each passage carries its source and the label
answers cite it by. Until an embedder has answered once, retrieval is `unavailable`.

Indexing is a job, one at a time, in the paper's fine-tuning / RAG state family of the CMS:
`cms/finetune/<job>/status` (queued, running, done, failed), `.../progress` ({done, total}
passages embedded), `.../model`, `.../documents`, `.../domain` and, when it failed, `.../error`.
A document is answered at once with its job (`KbJob`); the index is saved when the job is done
and persists across restarts; the catalogue of what the base holds is its own CMS entry,
`cms/agents/<agent>/documents`. Retrieval goes on while a job runs (on the index as it was).

For each domain of `checks` it also serves `knowledge/<domain>/check` with its lexicon
(services/kb/lexicon.py, WordNet's nouns): which of several answers to a question the entries
support, each compared with the question by the same embedder.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_fixed

from schemas import Check, Checked, KbDocument, KbJob, Passages, Retrieve
from services.core import cms
from services.core.bus import Bus, Request
from services.core.embeddings import embed
from services.core.errors import BadInput, EdgecollabError
from services.core.topics import FINETUNE, KB_CATALOG, KB_CHECK, KB_DOCUMENTS, KB_RETRIEVE
from services.kb.documents import DocumentError, parse
from services.kb.index import Document, Index
from services.kb.lexicon import Lexicon

log = structlog.get_logger("edgecollab.kb")

SHIPPED = Path(__file__).parent / "data"  # the curated set: <domain>.md
BATCH = 8  # passages embedded between two progress reports
JOB_EXPIRY_S = 7 * 24 * 3600.0  # a job's CMS entries outlive it by a week
EMBEDDER_RETRY_S = 1.0


class WrongEmbedder(EdgecollabError):
    """The site embeds with another model than the one this knowledge base expects."""


def _waiting(state: RetryCallState) -> None:
    failure = state.outcome.exception() if state.outcome else None
    if isinstance(failure, WrongEmbedder):
        log.warning("kb.wrong_embedder", reason=str(failure))
    else:
        log.info("kb.waiting_for_embedder", reason=str(failure))


def shipped(domains: Sequence[str], folder: Path = SHIPPED) -> list[Document]:
    """The curated documents of these domains (`<domain>.md` in `folder`)."""
    documents = []
    for domain in domains:
        path = folder / f"{domain}.md"
        if path.exists():
            text = path.read_text()
            documents.append(Document.of(domain, path.name, text, parse(path.name, text)))
    return documents


class KnowledgeBase:
    """Serves retrieval and documents for `domains`; `run_jobs` is its indexing loop."""

    def __init__(
        self,
        *,
        bus: Bus,
        agent: str,
        folder: Path,
        domains: Sequence[str],
        embedder: str,
        base_version: int = 0,
        lexicon: Lexicon | None = None,
        checks: Sequence[str] = (),
    ) -> None:
        self.bus = bus
        self.agent = agent
        self.index: Index | None = None  # opened once the embedder is known (`open`)
        self.folder = folder
        self.embedder = embedder  # the model name computation/embed must answer with
        self.domains = tuple(domains)
        self.jobs: asyncio.Queue[tuple[str, list[Document]]] = asyncio.Queue()
        self._versions: dict[str, int] = {}
        self._catalog_version = base_version
        for domain in self.domains:
            bus.serve(KB_RETRIEVE, self.handle_retrieve, shared=f"kb-{domain}", domain=domain)
            bus.serve(KB_DOCUMENTS, self.handle_document, domain=domain)
        self.lexicon = lexicon
        for domain in checks if lexicon is not None else ():
            bus.serve(KB_CHECK, self.handle_check, shared=f"kb-check-{domain}", domain=domain)
        bus.on_connect(self.publish_catalog)  # after a broker restart too

    async def handle_retrieve(self, request: Request[Retrieve]) -> Passages:
        ask = request.body
        started = time.perf_counter()
        index = self._ready()
        vector = (await self._embed([ask.text], index.model))[0]
        passages = index.search(
            ask.domain, vector, k=ask.k, min_score=ask.min_score, streams=tuple(ask.streams)
        )
        return Passages(
            request_id=ask.request_id,
            agent=self.agent,
            domain=ask.domain,
            model=index.model,
            passages=passages,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )

    async def handle_check(self, request: Request[Check]) -> Checked:
        ask = request.body
        started = time.perf_counter()
        assert self.lexicon is not None  # served only with one

        async def vectors(texts: list[str]) -> np.ndarray:
            return await self._embed(texts, self.embedder)

        question = (await vectors([ask.question]))[0]
        verdict = await self.lexicon.check(ask.question, question, ask.answers, vectors)
        return Checked(
            request_id=ask.request_id, agent=self.agent, domain=ask.domain, model=self.embedder,
            best=verdict.best, reason=verdict.reason, evidence=verdict.evidence,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )  # fmt: skip

    async def handle_document(self, request: Request[KbDocument]) -> KbJob:
        body = request.body
        try:
            chunks = parse(body.name, body.text, source=body.source)
        except DocumentError as exc:
            raise BadInput("bad_request", str(exc)) from None
        job = await self.submit([Document.of(body.domain, body.name, body.text, chunks)])
        return KbJob(request_id=body.request_id, agent=self.agent, job=job, domain=body.domain)

    async def submit(self, documents: list[Document]) -> str:
        """Queue a job that embeds and indexes `documents`; its id."""
        index = self._ready()
        job = f"{self.agent}-{uuid.uuid4().hex[:8]}"
        total = sum(len(d.chunks) for d in documents)
        await self._state(
            job,
            status="queued",
            progress={"done": 0, "total": total},
            model=index.model,
            documents=len(documents),
            domain=",".join(dict.fromkeys(d.domain for d in documents)),
        )
        self.jobs.put_nowait((job, documents))
        log.info("kb.job_queued", job=job, documents=len(documents), passages=total)
        return job

    async def open(self, seed: Sequence[Document]) -> None:
        """Wait for the site's embedder, open the index it made (or a new one), and index
        what the index lacks of `seed` and what another embedder had made."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(EdgecollabError),  # e.g. the classifier is starting
            wait=wait_fixed(EMBEDDER_RETRY_S),
            before_sleep=_waiting,
        )
        async for attempt in retrying:
            with attempt:
                probe = await embed(self.bus, ["probe"])
                if probe.model != self.embedder:
                    raise WrongEmbedder(f"the site's is {probe.model}, not {self.embedder}")
        index, stale = await asyncio.to_thread(
            Index.load, self.folder, self.embedder, probe.vectors.shape[1]
        )
        self.index = index
        todo = stale + [d for d in seed if not index.has(d.domain, d.name, d.sha256)]
        await self.publish_catalog()
        if todo:
            await self.submit(todo)

    async def run_jobs(self) -> None:
        """Run queued jobs one at a time, forever."""
        while True:
            job, documents = await self.jobs.get()
            await self._run(job, documents)

    async def _run(self, job: str, documents: list[Document]) -> None:
        total = sum(len(d.chunks) for d in documents)
        index = self._ready()
        await self._state(job, status="running")
        done, embedded = 0, []
        try:
            for document in documents:
                parts = []
                for start in range(0, len(document.chunks), BATCH):
                    texts = [c.embedded for c in document.chunks[start : start + BATCH]]
                    parts.append(await self._embed(texts, index.model))
                    done += len(texts)
                    await self._state(job, progress={"done": done, "total": total})
                embedded.append((document, np.concatenate(parts)))
            for document, vectors in embedded:
                index.put(document, vectors)
            await asyncio.to_thread(index.save, self.folder)
        except Exception as exc:  # the job fails, the service goes on
            log.exception("kb.job_failed", job=job)
            await self._state(job, status="failed", error=f"{type(exc).__name__}: {exc}")
            return
        await self._state(job, status="done")
        await self.publish_catalog()
        log.info("kb.job_done", job=job, passages=total, index=len(index))

    async def publish_catalog(self) -> None:
        """cms/agents/<agent>/documents: every document held, with its passage count."""
        if self.index is None:
            return  # nothing held until the embedder is known
        self._catalog_version += 1
        documents = [d.summary() for d in self.index.documents.values()]
        key = KB_CATALOG.format(agent=self.agent)
        await cms.put(self.bus, key, documents, version=self._catalog_version)

    def _ready(self) -> Index:
        if self.index is None:
            raise BadInput("unavailable", f"{self.agent} waits for an embedder (computation/embed)")
        return self.index

    async def _embed(self, texts: list[str], model: str) -> np.ndarray:
        """Vectors by the embedder that made the index (another one's do not compare)."""
        try:
            done = await embed(self.bus, texts)
        except EdgecollabError as exc:
            raise BadInput("unavailable", f"no embedder: {exc}") from None
        if done.model != model:
            raise BadInput("unavailable", f"the embedder is {done.model}, the index is {model}'s")
        return done.vectors

    async def _state(self, job: str, **fields: Any) -> None:
        for name, value in fields.items():
            version = self._versions[job] = self._versions.get(job, 0) + 1
            key = FINETUNE.format(job=job, field=name)
            await cms.put(self.bus, key, value, version=version, expiry_s=JOB_EXPIRY_S)
