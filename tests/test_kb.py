"""The knowledge base: documents into passages, retrieval with the real MiniLM, the service on a
real bus (indexing jobs in cms/finetune/, `edgecollab kb`), and answers that cite it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from schemas import Answer, CmsEntry, Passages, Query, Retrieve
from services.core.bus import Bus
from services.core.cms import CmsView
from services.core.embedder import Embedder
from services.core.errors import PeerGone, RemoteError
from services.core.topics import FINETUNE, KB_CATALOG, KB_RETRIEVE, QUERIES
from services.kb.documents import MAX_CHARS, DocumentError, check_text, parse
from services.kb.index import Document, Index
from services.kb.service import shipped
from tests.broker import ROOT
from tests.conftest import mqtt_client, running

DOMAINS = ("health", "environment")
STREAM_UNITS = {"heart_rate": "bpm", "spo2": "%", "body_temp": "°C", "respiration": "breaths/min",
                "pm25": "µg/m³", "no2": "µg/m³", "noise": "dB(A)"}  # fmt: skip

# Asked as a user would, written apart from the documents (and from the bench's questions).
PARAPHRASED = [
    ("health", "Is 110 beats per minute at rest a racing heart?", "Fast and slow heart rate"),
    ("health", "My pulse oximeter shows 93, is my blood oxygen ok?", "Blood oxygen saturation"),
    ("health", "What temperature means I am running a fever?", "Fever"),
    ("health", "What counts as high blood pressure stage 2?", "Blood pressure categories"),
    ("environment", "How much fine dust in the air per day is safe according to WHO?", "Fine par"),
    ("environment", "What sound level is safe for a rock concert audience?", "Safe listening"),
]


def cli(mqtt, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "kb", *args,
         "--broker", f"{mqtt.host}:{mqtt.port}"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# -- documents -------------------------------------------------------------------------------


def test_every_shipped_passage_names_its_source_and_the_vitals_and_pollutants_have_ranges():
    documents = shipped(DOMAINS)
    assert [d.name for d in documents] == ["health.md", "environment.md"]
    chunks = [c for d in documents for c in d.chunks]
    assert all(c.source and c.cite and len(c.text) <= MAX_CHARS for c in chunks)
    ranges = {c.stream: c.unit for c in chunks if c.unit}
    assert {s: ranges.get(s) for s in STREAM_UNITS} == STREAM_UNITS
    pm25 = next(c for c in chunks if c.stream == "pm25")
    assert (pm25.low, pm25.high, pm25.cite) == (None, 15.0, "WHO 2021")
    heart = next(c for c in chunks if c.stream == "heart_rate")
    assert (heart.low, heart.high, heart.label) == (60.0, 100.0, "normal at rest")


def test_markdown_sections_their_metadata_and_long_paragraphs():
    long = " ".join(f"Sentence number {i} says something about sleep." for i in range(40))
    text = (
        "# Notes\nsource: My clinic's handbook\ncite: Handbook\n\n"
        "## Sleep\nstream: sleep\nrange: 7-9 h (for adults)\n\n" + long + "\n\n"
        "## Other\nsource: A leaflet\n\nShort text.\nOn two lines.\n"
    )
    chunks = parse("notes.md", text)
    sleep = [c for c in chunks if c.title == "Sleep"]
    assert len(sleep) > 1 and all(len(c.text) <= MAX_CHARS for c in sleep)
    assert " ".join(c.text for c in sleep) == long  # cut at sentences, nothing lost
    assert {(c.source, c.cite, c.low, c.high, c.unit, c.label) for c in sleep} == {
        ("My clinic's handbook", "Handbook", 7.0, 9.0, "h", "for adults")
    }
    other = chunks[-1]
    assert (other.title, other.text, other.source, other.cite) == (
        "Other", "Short text. On two lines.", "A leaflet", "Handbook",
    )  # fmt: skip
    plain = parse("plain.txt", "Just a line of text.", source="Me")
    assert [(c.title, c.source, c.cite) for c in plain] == [("plain.txt", "Me", "Me")]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("## A\nrange: 1-2 bpm\n\ntext", "a range needs a stream"),
        ("## A\nstream: pulse\n\ntext", "unknown stream 'pulse'"),
        ("## A\nstream: heart_rate\nrange: 60-100 mmHg\n\ntext", "in 'bpm', the range in 'mmHg'"),
        ("## A\nstream: heart_rate\nrange: about sixty\n\ntext", "is not 'LOW-HIGH UNIT'"),
        ("# Only headings\n## And more\n", "has no text to index"),
    ],
)
def test_documents_that_cannot_be_indexed_say_why(text, error):
    with pytest.raises(DocumentError, match=error.replace("(", r"\(")):
        parse("x.md", text)


@pytest.mark.parametrize(
    ("data", "error"),
    [(b"", "empty"), (b" \n\t\n", "empty"), (b"ab\x00cd", "not text"),
     (b"\xff\xfe\x00", "not text"), (b"caf\xe9", "not UTF-8")],
)  # fmt: skip
def test_files_that_are_not_text_are_refused(data, error):
    with pytest.raises(DocumentError, match=error):
        check_text(data, "f")


def test_the_index_is_saved_whole_and_opened_again_by_the_same_embedder_only(tmp_path: Path):
    chunks = parse("a.md", "## One\n\nfirst\n\n## Two\n\nsecond")
    document = Document.of("health", "a.md", "text", chunks)
    vectors = np.eye(2, 4, dtype=np.float32)
    index = Index("m", 4)
    index.put(document, vectors)
    index.save(tmp_path)
    again, stale = Index.load(tmp_path, "m", 4)
    assert stale == [] and len(again) == 2 and again.has("health", "a.md", document.sha256)
    [nearest] = again.search("health", np.array([0, 1, 0, 0], np.float32), k=1)
    assert (nearest.title, nearest.score, nearest.id) == ("Two", 1.0, "health/a.md#1")
    assert again.search("environment", vectors[0], k=3) == []
    other, stale = Index.load(tmp_path, "another-model", 4)
    assert len(other) == 0 and [d.name for d in stale] == ["a.md"]  # to be embedded again
    (tmp_path / "index.npz").write_bytes(b"not an npz")
    empty, stale = Index.load(tmp_path, "m", 4)
    assert len(empty) == 0 and stale == [] and (tmp_path / "index.npz.bad").exists()


# -- retrieval with the real MiniLM ----------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_index(minilm_dir: Path) -> tuple[Embedder, Index]:
    embedder = Embedder.load(minilm_dir, threads=1)
    index = Index(embedder.card.name, embedder.dims)
    for document in shipped(DOMAINS):
        index.put(document, embedder.embed([c.embedded for c in document.chunks]))
    return embedder, index


@pytest.mark.parametrize(("domain", "question", "title"), PARAPHRASED)
def test_a_paraphrased_question_finds_the_passage_that_answers_it(
    shipped_index, domain, question, title
):
    """Among the three the orchestrator gives the models (RETRIEVE_K)."""
    embedder, index = shipped_index
    found = index.search(domain, embedder.embed([question])[0], k=3)
    right = [p for p in found if p.title.startswith(title)]
    assert right, [(p.title, p.score) for p in found]
    assert right[0].source and right[0].cite and right[0].matched == "text"


def test_streams_add_their_reference_passage_after_the_nearest(shipped_index):
    embedder, index = shipped_index
    vector = embedder.embed(["Check my vitals and tell me if anything is wrong"])[0]
    found = index.search("health", vector, k=2, min_score=0.3, streams=("heart_rate", "spo2"))
    near = [p for p in found if p.matched == "text"]
    references = {p.stream: p for p in found if p.matched == "stream"}
    assert len(near) <= 2 and all(p.score >= 0.3 for p in near)
    assert references["heart_rate"].low == 60 and references["heart_rate"].cite == "MedlinePlus"
    assert "spo2" in references or any(p.stream == "spo2" for p in near)
    off_topic = index.search("health", embedder.embed(["What is 17 times 23?"])[0], k=3,
                             min_score=0.3)  # fmt: skip
    assert off_topic == []


# -- the service on a real bus ---------------------------------------------------------------


class Jobs:
    """Every value each job's fields took, in the order they arrived (a CMS view's changes)."""

    def __init__(self, view: CmsView, prefix: str) -> None:
        self.fields: dict[str, dict[str, list[object]]] = {}
        self.view = view
        prefix = f"cms/finetune/{prefix}"

        def seen(key: str, entry: CmsEntry | None) -> None:
            params = FINETUNE.match(key)
            if key.startswith(prefix) and params and entry is not None:
                job = self.fields.setdefault(params["job"], {})
                job.setdefault(params["field"], []).append(entry.value)

        view.on_change(seen)

    def statuses(self, job: str) -> list[object]:
        return self.fields.get(job, {}).get("status", [])

    def done(self) -> list[str]:
        return [j for j in self.fields if self.statuses(j)[-1:] == ["done"]]

    async def until_done(self, count: int) -> list[str]:
        assert await self.view.changes.until(lambda: len(self.done()) >= count, timeout=120)
        return self.done()


async def retrieve(bus: Bus, domain: str, text: str, **extra) -> Passages:  # type: ignore[no-untyped-def]
    ask = Retrieve(request_id=f"r{time.time_ns()}", domain=domain, text=text,
                   deadline=time.time() + 30, **extra)  # fmt: skip
    reply = await bus.request(KB_RETRIEVE.format(domain=domain), ask, deadline=ask.deadline)
    assert isinstance(reply, Passages)
    return reply


async def test_the_knowledge_base_indexes_as_a_job_answers_and_keeps_what_is_added(
    mqtt, login, uid, spawn, minilm_dir, tmp_path
):
    agent, folder = f"kb-{uid}", tmp_path / "index"
    args = ("--agent-id", agent, "--index-dir", str(folder))
    operator = f"operator-{uid}"  # reads the jobs (cms/finetune), asks the knowledge base
    bus = Bus(settings=login(operator, "operator"), client_id=operator, service="test")
    view = CmsView(bus)
    jobs = Jobs(view, f"{agent}-")
    note = tmp_path / "hydration.md"
    note.write_text(
        "# Hydration\nsource: Our ward's care notes (2024)\ncite: Ward notes\n\n"
        "## Drinking water in hot weather\n\nDuring a heatwave adults should drink water "
        "regularly through the day, before they feel thirsty, and avoid alcohol.\n"
    )
    async with running(bus):
        await view.synced()
        kb = spawn("services.kb", *args)
        assert await view.wait_online([agent], timeout=60)
        with pytest.raises(RemoteError, match="waits for an embedder"):  # no classifier yet
            await retrieve(bus, "health", "What temperature means I am running a fever?")
        spawn("services.classifier", "--agent-id", f"cls-{uid}", "--model-dir", str(minilm_dir))
        [seed] = await jobs.until_done(1)
        assert view.online(agent) and view.cards[agent].kind == "kb"
        assert view.cards[agent].domains == ["health", "environment"]
        reply = await retrieve(bus, "health", "What temperature means I am running a fever?")
        added = await asyncio.to_thread(cli, mqtt, "add", str(note), "--domain", "health")
        assert added.returncode == 0, added.stderr
        [job] = [j for j in await jobs.until_done(2) if j != seed]
        found = await asyncio.to_thread(cli, mqtt, "search", "how much to drink when it is hot",
                                        "--domain", "health", "-k", "1")  # fmt: skip
        listed = await asyncio.to_thread(cli, mqtt, "ls")
        catalog = KB_CATALOG.format(agent=agent)
        before = view.get(catalog)
        kb.terminate()
        kb.wait(30)
        assert await view.changes.until(lambda: not view.online(agent), timeout=30)
        spawn("services.kb", *args)  # the same index folder: what was added is still there
        assert await view.changes.until(  # its catalogue again: the index is open
            lambda: (entry := view.get(catalog)) is not None and entry.version > before.version,
            timeout=60,
        )
        again = await retrieve(bus, "health", "how much to drink when it is hot", k=1)
        with pytest.raises(PeerGone):  # no knowledge base holds the domain: nobody subscribed
            await retrieve(bus, "cooking", "how long to boil an egg")

    for name in (seed, job):  # the paper's fine-tuning / RAG state, as it changed
        assert jobs.statuses(name) == ["queued", "running", "done"], jobs.fields[name]
    fields = jobs.fields[seed]
    assert fields["progress"][-1] == {"done": 27, "total": 27}
    assert (fields["model"], fields["documents"], fields["domain"]) == (
        ["all-MiniLM-L6-v2"], [2], ["health,environment"],
    )  # fmt: skip
    assert jobs.fields[job]["progress"][-1] == {"done": 1, "total": 1}
    assert "error" not in jobs.fields[job]
    assert reply.passages[0].title == "Fever" and reply.passages[0].cite == "CDC"
    assert reply.model == "all-MiniLM-L6-v2" and reply.agent == agent
    assert f"hydration.md: 1 passage for health, job {job} on {agent}" in added.stdout
    assert "done 1/1 passages" in added.stdout
    assert "[Ward notes] Drinking water in hot weather  (health/hydration.md#0)" in found.stdout
    assert f"{agent} (online, all-MiniLM-L6-v2): health, environment" in listed.stdout
    assert "hydration.md" in listed.stdout and job in listed.stdout
    assert again.passages[0].document == "hydration.md" and (folder / "index.npz").exists()


async def test_kb_add_refuses_what_it_cannot_index_in_one_line(mqtt, uid, tmp_path):
    cases = {
        "empty.md": (b"", "is empty"),
        "blank.md": (b"\n\n  \n", "is empty"),
        "image.png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not text"),
        "latin1.txt": (b"caf\xe9 au lait", "is not UTF-8 text"),
        "huge.md": (b"word " * 40000, "a document may have at most 131,072"),
        "range.md": (b"## A\nrange: 1-2 bpm\n\ntext", "a range needs a stream"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    runs = {name: cli(mqtt, "add", str(tmp_path / name), "--domain", "health") for name in cases}
    runs["missing"] = cli(mqtt, "add", str(tmp_path / "missing.md"))
    (tmp_path / "ok.md").write_text("Some text.")
    runs["domain"] = cli(mqtt, "add", str(tmp_path / "ok.md"), "--domain", f"cooking{uid}")
    expected = {name: why for name, (_, why) in cases.items()}
    expected |= {"missing": "cannot read", "domain": f"holds domain 'cooking{uid}'"}
    for name, run in runs.items():
        assert run.returncode == 1, (name, run.stdout, run.stderr)
        assert run.stderr.startswith("edgecollab: ") and run.stderr.count("\n") == 1, run.stderr
        assert expected[name] in run.stderr, (name, run.stderr)


# -- answers cite it -------------------------------------------------------------------------


async def test_health_answers_cite_the_knowledge_base_and_ground_ranges_in_it(
    mqtt, login, uid, spawn, minilm_dir, tmp_path
):
    agents = [f"orch-{uid}", f"cls-{uid}", f"slm-{uid}", f"kb-{uid}"]
    spawn("services.orchestrator", "--agent-id", agents[0])
    spawn("services.classifier", "--agent-id", agents[1], "--model-dir", str(minilm_dir))
    spawn("services.worker", "--agent-id", agents[2], "--tokens-per-s", "500",
          "--domains", '["health"]')  # fmt: skip
    spawn("services.kb", "--agent-id", agents[3], "--index-dir", str(tmp_path))
    watch = f"watch-{uid}"
    topic = f"data/health/heart_rate/{watch}"
    operator = f"operator-{uid}"  # reads the jobs (cms/finetune) and asks
    bus = Bus(settings=login(operator, "operator"), client_id=operator, service="test")
    view = CmsView(bus)
    jobs = Jobs(view, f"kb-{uid}-")

    async def ask(text: str) -> Answer:
        query = Query(request_id=f"q{time.time_ns()}", text=text, max_tokens=16,
                      deadline=time.time() + 90)  # fmt: skip
        answer = await bus.request(QUERIES.format(), query, deadline=query.deadline)
        assert isinstance(answer, Answer) and answer.outcome == "edge", answer
        return answer

    async with running(bus), mqtt_client(login(watch, "sensor")) as device:
        await view.synced()
        assert await view.wait_online(agents, timeout=90)
        await jobs.until_done(1)
        plain = await ask("What heart rate is normal for an adult at rest?")
        now = int(time.time())
        try:
            for i in range(5):
                body = (
                    f'{{"v":1,"type":"reading","agent":"{watch}","domain":"health",'
                    f'"stream":"heart_rate","value":148,"unit":"bpm","ts":{now - 4 + i}}}'
                )
                await device.publish(topic, body, qos=1, retain=True)  # fmt: skip
            grounded = await ask("My heart is racing. Check my vitals: is anything wrong?")
        finally:
            await device.publish(topic, b"", retain=True)

    step = next(s for s in plain.steps if s.name == "retrieve:health")
    assert (step.agent, step.outcome, step.topic) == (agents[3], "ok", "knowledge/health/retrieve")
    assert "[MedlinePlus] Resting heart rate" in (step.detail or "")
    assert any(p.title == "Resting heart rate" for p in plain.passages)
    assert '[MedlinePlus] MedlinePlus, "Vital signs"' in plain.text.split("Sources: ")[-1]

    assert "\n\nFrom the knowledge base [MedlinePlus], Resting heart rate: " in plain.text
    assert plain.verified is not None  # the model's numbers checked against the passages

    assert "heart rate 148 bpm (steady), above the tachycardia threshold of 100 bpm, normal at " \
           "rest: 60-100 bpm [MedlinePlus]" in grounded.text  # fmt: skip
    sources = grounded.text.split("\n\nSources: ")[-1]
    assert '[MedlinePlus] MedlinePlus, "Vital signs"' in sources
    heart = next(p for p in grounded.passages if p.stream == "heart_rate")
    assert (heart.low, heart.high, heart.unit) == (60, 100, "bpm")
    assert grounded.verified is True
