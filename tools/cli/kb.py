"""`edgecollab kb add|ls|search|check`: the site's knowledge bases (services/kb).

`kb add FILE [--domain D]` sends a text or markdown document (services/kb/documents.py says how
one is cut into passages and how a section names its source) to the knowledge bases of its
domain (without --domain: the one the Classifier Engine gives its beginning), then follows the
indexing job in the CMS (cms/finetune/<job>/...) until it is done or failed. `kb check QUESTION
ANSWER ANSWER...` asks a lexicon (knowledge/<domain>/check) which answer its entries support.
"""

from __future__ import annotations

import argparse
import asyncio
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from schemas import (
    MAX_CHECKED_ANSWERS,
    MAX_DOCUMENT_CHARS,
    Check,
    Checked,
    Classification,
    ClassifyRequest,
    CmsEntry,
    KbDocument,
    KbJob,
    Passage,
    Passages,
    Retrieve,
)
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.errors import DeadlineExceeded, PeerGone, RemoteError
from services.core.topics import (
    CLASSIFY,
    FINETUNE,
    KB_CATALOG,
    KB_CHECK,
    KB_DOCUMENTS,
    KB_RETRIEVE,
)
from services.kb.documents import check_text, parse
from tools.common import add_broker_option, connected_bus, print_json

MAX_DOCUMENT_BYTES = MAX_DOCUMENT_CHARS  # bytes, too: what one message carries with room to spare
REQUEST_S = 30.0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("kb", help="the knowledge bases: add documents, list, search, check")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add = verbs.add_parser("add", help="add a text or markdown document; follow its indexing")
    add.add_argument("file", type=Path)
    add.add_argument("--domain", help="its domain (default: the classifier's for its text)")
    add.add_argument("--source", help="cite every passage of it as this (default: its own)")
    add.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (300)")
    ls = verbs.add_parser("ls", help="the knowledge bases, their documents and recent jobs")
    search = verbs.add_parser("search", help="the passages nearest a text")
    search.add_argument("text")
    search.add_argument("--domain", help="only this domain (default: every one held)")
    search.add_argument("-k", type=int, default=3, help="passages shown (3)")
    check = verbs.add_parser("check", help="which of some answers a lexicon's entries support")
    check.add_argument("question", help="the question the answers answer")
    check.add_argument("answers", nargs="+", metavar="ANSWER", help="the answers to judge (1-8)")
    check.add_argument("--domain", default="facts", help="the lexicon's domain (facts)")
    for verb in (ls, search, check):
        verb.add_argument("--json", action="store_true", help="JSON output")
    for verb, run in ((add, _add), (ls, _ls), (search, _search), (check, _check)):
        add_broker_option(verb)
        verb.set_defaults(func=lambda args, run=run: asyncio.run(run(args)))


def read_document(path: Path) -> str:
    """The text of a document file, or a one-line error (missing, too big, binary, empty)."""
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise SystemExit(
                f"edgecollab: {path} has {size:,} bytes; a document may have at most "
                f"{MAX_DOCUMENT_BYTES:,} (split it)"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise SystemExit(f"edgecollab: cannot read {path}: {exc.strerror}") from None
    return check_text(data, str(path))


def held(view: CmsView) -> dict[str, list[str]]:
    """Domain → the online knowledge bases that hold it."""
    domains: dict[str, list[str]] = {}
    for agent in view.agents("kb"):
        if agent.online:
            for domain in agent.card.domains:
                domains.setdefault(domain, []).append(agent.card.agent)
    return domains


def _unheld(domain: str, domains: dict[str, list[str]]) -> SystemExit:
    online = ", ".join(sorted(domains)) or "none"
    return SystemExit(
        f"edgecollab: no knowledge base online holds domain {domain!r} (held: {online})"
    )


async def _add(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise SystemExit("edgecollab: --timeout must be positive")
    text = read_document(args.file)
    name = args.file.name
    passages = len(parse(name, text, source=args.source))  # refuses what cannot be indexed
    async with connected_bus(args, mirror_cms=True) as (bus, view):
        assert view is not None
        domains = held(view)
        domain = args.domain or await _classified(bus, view, text, domains)
        if domain not in domains:
            raise _unheld(domain, domains)
        document = KbDocument(
            request_id=f"kb-{uuid.uuid4().hex[:12]}", domain=domain, name=name, text=text,
            source=args.source, deadline=time.time() + REQUEST_S,
        )  # fmt: skip
        try:
            reply = await bus.request(
                KB_DOCUMENTS.format(domain=domain), document, deadline=document.deadline
            )
        except RemoteError as exc:
            raise SystemExit(f"edgecollab: {exc.error.message}") from None
        except (DeadlineExceeded, PeerGone) as exc:
            raise SystemExit(f"edgecollab: {exc}") from None
        assert isinstance(reply, KbJob)
        count = counted(passages, "passage")
        print(f"{name}: {count} for {domain}, job {reply.job} on {reply.agent}")
        status = await _follow(view, reply.job, args.timeout)
    return 0 if status == "done" else 1


async def _classified(bus: Bus, view: CmsView, text: str, domains: dict[str, list[str]]) -> str:
    """The Classifier Engine's domain for the document's beginning."""
    if not any(a.online for a in view.agents("classifier")):
        held_now = ", ".join(sorted(domains)) or "none"
        raise SystemExit(
            f"edgecollab: say --domain (no classifier online to choose one; held: {held_now})"
        )
    ask = ClassifyRequest(request_id=f"kb-{uuid.uuid4().hex[:12]}", text=text[:2000])
    try:
        reply = await bus.request(CLASSIFY.format(), ask, deadline=time.time() + REQUEST_S)
    except (DeadlineExceeded, RemoteError, PeerGone) as exc:
        raise SystemExit(f"edgecollab: say --domain (the classifier: {exc})") from None
    assert isinstance(reply, Classification)
    print(f"domain: {reply.domain} (the classifier's, {reply.confidence:.2f})")
    return reply.domain


async def _follow(view: CmsView, job: str, timeout: float) -> str | None:
    """Print a job's progress until it is done or failed; its last status."""
    shown: list[tuple[Any, Any]] = []

    def value(field: str) -> Any:
        entry = view.get(FINETUNE.format(job=job, field=field))
        return entry.value if entry is not None else None

    def show(key: str, _entry: CmsEntry | None) -> None:
        if not key.startswith(f"cms/finetune/{job}/"):
            return
        now = (value("status"), value("progress"))
        if now != (shown[-1] if shown else None):
            shown.append(now)
            status, progress = now
            done = f" {progress['done']}/{progress['total']} passages" if progress else ""
            print(f"  {status}{done}", flush=True)

    view.on_change(show)
    show(f"cms/finetune/{job}/status", None)
    finished = await view.changes.until(
        lambda: value("status") in ("done", "failed"), timeout=timeout
    )
    status = value("status")
    if not finished:
        print(f"edgecollab: job {job} is still {status} after {timeout:.0f} s")
    elif status == "failed":
        print(f"edgecollab: job {job} failed: {value('error')}")
    return str(status) if finished else None


async def _ls(args: argparse.Namespace) -> int:
    async with connected_bus(args, mirror_cms=True) as (_, view):
        assert view is not None
    bases: list[dict[str, Any]] = [
        {
            "agent": a.card.agent,
            "online": a.online,
            "model": a.card.model.name if a.card.model else None,
            "domains": a.card.domains,
            "documents": _catalog(view, a.card.agent),
        }
        for a in view.agents("kb")
    ]
    jobs = _jobs(view)
    if args.json:
        print_json({"knowledge_bases": bases, "jobs": jobs})
        return 0
    if not bases:
        print("no knowledge base in the CMS")
    for base in bases:
        state = "online" if base["online"] else "offline"
        print(f"{base['agent']} ({state}, {base['model']}): {', '.join(base['domains'])}")
        for doc in base["documents"]:
            sources = "; ".join(doc.get("sources", []))
            print(f"  {doc['domain']:<12} {doc['name']:<24} "
                  f"{counted(doc['passages'], 'passage'):>12}  "
                  f"{textwrap.shorten(sources, 60)}")  # fmt: skip
    if jobs:
        print("jobs:")
    for job in jobs:
        progress = job.get("progress") or {}
        print(f"  {job['job']:<20} {job.get('status', '?'):<8} "
              f"{progress.get('done', 0)}/{progress.get('total', 0)} passages, "
              f"{counted(job.get('documents', 0), 'document')} ({job.get('domain', '')})"
              + (f": {job['error']}" if job.get("error") else ""))  # fmt: skip
    return 0


def _catalog(view: CmsView, agent: str) -> list[dict[str, Any]]:
    entry = view.get(KB_CATALOG.format(agent=agent))
    return list(entry.value) if entry is not None and isinstance(entry.value, list) else []


def _jobs(view: CmsView) -> list[dict[str, Any]]:
    """Every job in the CMS with its fields, the latest first."""
    jobs: dict[str, dict[str, Any]] = {}
    changed: dict[str, float] = {}
    for key, entry in view.items("finetune/"):
        params = FINETUNE.match(key)
        if params is not None:
            jobs.setdefault(params["job"], {"job": params["job"]})[params["field"]] = entry.value
            changed[params["job"]] = max(changed.get(params["job"], 0.0), entry.updated_at)
    return sorted(jobs.values(), key=lambda j: -changed[j["job"]])


async def _search(args: argparse.Namespace) -> int:
    if not 1 <= args.k <= 20:
        raise SystemExit("edgecollab: -k must be 1-20")
    if not args.text.strip() or len(args.text) > 2000:
        raise SystemExit("edgecollab: the text must have 1-2000 characters")
    async with connected_bus(args, mirror_cms=True) as (bus, view):
        assert view is not None
        domains = held(view)
        if args.domain and args.domain not in domains:
            raise _unheld(args.domain, domains)
        if not domains:
            raise SystemExit("edgecollab: no knowledge base is online")
        chosen = [args.domain] if args.domain else sorted(domains)
        found = await asyncio.gather(*(_retrieve(bus, d, args.text, args.k) for d in chosen))
    passages = sorted((p for ps in found for p in ps), key=lambda p: -p.score)[: args.k]
    if args.json:
        print_json([p.model_dump(mode="json") for p in passages])
        return 0
    for p in passages:
        print(f"{p.score:.2f}  [{p.cite}] {p.title}  ({p.id})")
        print(textwrap.indent(textwrap.fill(p.text, 92), "      "))
    return 0 if passages else 1


async def _retrieve(bus: Bus, domain: str, text: str, k: int) -> list[Passage]:
    ask = Retrieve(
        request_id=f"kb-{uuid.uuid4().hex[:12]}", domain=domain, text=text, k=k,
        deadline=time.time() + REQUEST_S,
    )  # fmt: skip
    try:
        reply = await bus.request(KB_RETRIEVE.format(domain=domain), ask, deadline=ask.deadline)
    except (DeadlineExceeded, RemoteError, PeerGone) as exc:
        raise SystemExit(f"edgecollab: {domain}: {exc}") from None
    assert isinstance(reply, Passages)
    return list(reply.passages)


async def _check(args: argparse.Namespace) -> int:
    if not args.question.strip() or len(args.question) > 2000:
        raise SystemExit("edgecollab: the question must have 1-2000 characters")
    if len(args.answers) > MAX_CHECKED_ANSWERS:
        raise SystemExit(f"edgecollab: at most {MAX_CHECKED_ANSWERS} answers")
    async with connected_bus(args, mirror_cms=True) as (bus, view):
        assert view is not None
        if not any(a.online and args.domain in a.card.checks for a in view.agents("kb")):
            raise SystemExit(f"edgecollab: no lexicon online checks domain {args.domain!r}")
        ask = Check(
            request_id=f"kb-{uuid.uuid4().hex[:12]}", domain=args.domain, question=args.question,
            answers=args.answers, deadline=time.time() + REQUEST_S,
        )  # fmt: skip
        try:
            reply = await bus.request(
                KB_CHECK.format(domain=args.domain), ask, deadline=ask.deadline
            )
        except (DeadlineExceeded, RemoteError, PeerGone) as exc:
            raise SystemExit(f"edgecollab: {args.domain}: {exc}") from None
    assert isinstance(reply, Checked)
    if args.json:
        print_json(reply.model_dump(mode="json"))
        return 0
    print(f"{reply.agent}: {reply.reason}")
    for e in reply.evidence:
        mark = "*" if e.answer == reply.best else " "
        print(f"{mark} {e.score:.2f}  answer {e.answer + 1}: {e.term!r}  ({e.source})")
        print(textwrap.indent(textwrap.fill(e.entry, 92), "      "))
    if reply.best is not None:
        print(f"supported: answer {reply.best + 1}: {args.answers[reply.best]}")
    return 0 if reply.best is not None else 1


def counted(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
