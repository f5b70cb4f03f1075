"""Model export: GGUF and Hugging Face folders to the worker's ONNX decoder, checked with numpy."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from services.worker.engine import DecoderRunner, Engine
from tools.cli import main as cli
from tools.export.gguf import _q4_1_to_int4
from tools.export.source import dequantize_int4, quantize_int4
from tools.export.tiny import CHAT_TEMPLATE, SPECIALS, tiny_spec, tiny_tokenizer, tiny_weights

CARD_KEYS = {
    "name",
    "architecture",
    "parameters",
    "quantization",
    "context_length",
    "vocab_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "bos_token_id",
    "eos_token_id",
    "stop_token_ids",
    "chat_template",
    "default_system_prompt",
}


def reference_logits(spec, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Last-position logits of a llama/qwen2 decoder in plain numpy (HF conventions)."""
    x = w["embed"][ids].astype(np.float64)
    half = spec.head_dim // 2
    angles = np.outer(np.arange(len(ids)), spec.rope_theta ** (-np.arange(half) / half))
    cos, sin = np.cos(angles), np.sin(angles)

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + spec.rms_eps) * g

    def heads(v, n):
        v = v.reshape(len(ids), n, spec.head_dim).transpose(1, 0, 2)
        a, b = v[..., :half], v[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    group = spec.num_heads // spec.num_kv_heads
    mask = np.triu(np.full((len(ids), len(ids)), -np.inf), 1)
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        h = rms(x, w[p + "attn_norm"])
        q, k, v = (h @ w[p + n].T + w.get(p + n + "_bias", 0) for n in "qkv")
        q, k = heads(q, spec.num_heads), np.repeat(heads(k, spec.num_kv_heads), group, 0)
        v = np.repeat(v.reshape(len(ids), spec.num_kv_heads, -1).transpose(1, 0, 2), group, 0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(spec.head_dim) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (probs / probs.sum(-1, keepdims=True)) @ v
        x = x + attn.transpose(1, 0, 2).reshape(len(ids), -1) @ w[p + "o"].T
        h = rms(x, w[p + "mlp_norm"])
        gate = h @ w[p + "gate"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "up"].T)) @ w[p + "down"].T
    return rms(x, w["norm"])[-1] @ w.get("lm_head", w["embed"]).T


def onnx_logits(folder: Path, ids: list[int]) -> np.ndarray:
    runner = DecoderRunner(Engine.load(folder), slots=1, capacity=64)
    return runner.prefill(0, np.array(ids), 0)


IDS = [1, 40, 77, 250, 12, 99, 3, 180, 200, 7, 64, 65]


# --- Hugging Face folders ---------------------------------------------------------------------

_HF_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
}


def _bf16(array: np.ndarray) -> np.ndarray:
    """Round to bfloat16 and widen back (what a BF16 checkpoint holds)."""
    bits = (array.astype(np.float32).view(np.uint32) + 0x8000) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], bf16: set[str]) -> None:
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        raw = (
            (_bf16(array).view(np.uint32) >> 16).astype(np.uint16).tobytes()
            if name in bf16
            else array.astype(np.float32).tobytes()
        )
        header[name] = {
            "dtype": "BF16" if name in bf16 else "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def make_hf_folder(folder: Path, arch: str) -> tuple[object, dict[str, np.ndarray]]:
    """A tiny llama (tied, BF16 matrices) or qwen2 (biases, own LM head) checkpoint."""
    tokenizer = tiny_tokenizer()
    spec = tiny_spec(tokenizer.get_vocab_size())
    w = tiny_weights(spec, seed=3)
    rng = np.random.default_rng(4)
    if arch == "qwen2":
        kv = spec.num_kv_heads * spec.head_dim
        for i in range(spec.num_layers):
            for n, size in (("q", spec.hidden_size), ("k", kv), ("v", kv)):
                w[f"layers.{i}.{n}_bias"] = rng.standard_normal(size).astype(np.float32) * 0.1
        w["lm_head"] = rng.standard_normal(w["embed"].shape).astype(np.float32) * 0.3
    tensors = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"]}
    if "lm_head" in w:
        tensors["lm_head.weight"] = w["lm_head"]
    for name, array in w.items():
        if name.startswith("layers."):
            _, i, part = name.split(".", 2)
            tensors[f"model.layers.{i}.{_HF_NAMES[part]}"] = array
    bf16 = {n for n in tensors if arch == "llama" and n.endswith("proj.weight")}
    folder.mkdir(parents=True)
    write_safetensors(folder / "model.safetensors", tensors, bf16)
    config = {
        "model_type": arch,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_eps,
        "max_position_embeddings": spec.context_length,
        "tie_word_embeddings": arch == "llama",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save(str(folder / "tokenizer.json"))
    tok_config = {
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "bos_token": "<|im_start|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    weights = {n: _bf16(a) if f"model.{n}" in bf16 else a for n, a in w.items()}
    for name in list(weights):
        if name.startswith("layers."):
            _, i, part = name.split(".", 2)
            if f"model.layers.{i}.{_HF_NAMES[part]}" in bf16:
                weights[name] = _bf16(w[name])
    return spec, weights


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_folder_exports_the_same_function_as_numpy(tmp_path: Path, arch: str) -> None:
    spec, weights = make_hf_folder(tmp_path / "hf", arch)
    assert (
        cli.main(
            ["export-model", str(tmp_path / "hf"), str(tmp_path / "out"), "--precision", "fp32"]
        )
        == 0
    )
    card = json.loads((tmp_path / "out" / "model.json").read_text())
    assert card.keys() >= CARD_KEYS
    assert card["architecture"] == arch and card["quantization"] == "fp32"
    assert card["stop_token_ids"][0] == 2 and card["chat_format"] == "chatml"
    assert card["default_system_prompt"] == "You are a tiny test model."
    got = onnx_logits(tmp_path / "out", IDS)
    np.testing.assert_allclose(got, reference_logits(spec, weights, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int4_export_computes_with_the_quantized_weights(tmp_path: Path, arch: str) -> None:
    spec, weights = make_hf_folder(tmp_path / "hf", arch)
    assert cli.main(["export-model", str(tmp_path / "hf"), str(tmp_path / "int4")]) == 0
    as_int4 = {
        n: dequantize_int4(quantize_int4(w)) if w.ndim == 2 else w for n, w in weights.items()
    }
    got = onnx_logits(tmp_path / "int4", IDS)
    # MatMulNBits at accuracy level 4 also rounds activations to int8: close, not exact.
    assert np.corrcoef(got, reference_logits(spec, as_int4, IDS))[0, 1] > 0.995
    assert np.corrcoef(got, reference_logits(spec, weights, IDS))[0, 1] > 0.9


# --- GGUF ------------------------------------------------------------------------------------


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders Q/K rows so rotary pairs are adjacent."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def make_gguf(path: Path) -> tuple[object, dict[str, np.ndarray]]:
    """A tiny llama GGUF like SmolLM2's: Q4_1 matrices, Q8_0 embedding, byte-level tokenizer."""
    tokenizer = tiny_tokenizer()
    spec = tiny_spec(tokenizer.get_vocab_size())
    w = tiny_weights(spec, seed=5)
    writer = GGUFWriter(path, "llama")
    for add, value in (
        (writer.add_block_count, spec.num_layers),
        (writer.add_context_length, spec.context_length),
        (writer.add_embedding_length, spec.hidden_size),
        (writer.add_feed_forward_length, spec.intermediate_size),
        (writer.add_head_count, spec.num_heads),
        (writer.add_head_count_kv, spec.num_kv_heads),
        (writer.add_rope_freq_base, spec.rope_theta),
        (writer.add_layer_norm_rms_eps, spec.rms_eps),
        (writer.add_rope_dimension_count, spec.head_dim),
        (writer.add_tokenizer_model, "gpt2"),
        (writer.add_tokenizer_pre, "smollm"),
        (writer.add_bos_token_id, 1),
        (writer.add_eos_token_id, 2),
        (writer.add_chat_template, CHAT_TEMPLATE),
    ):
        add(value)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    writer.add_token_merges([])
    exact = {}

    def put(name: str, array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        data = quantize(array, qtype) if qtype != GGMLQuantizationType.F32 else array
        writer.add_tensor(name, data, raw_dtype=qtype)
        return dequantize(data, qtype).reshape(array.shape).astype(np.float32)

    exact["embed"] = put("token_embd.weight", w["embed"], GGMLQuantizationType.Q8_0)
    exact["norm"] = put("output_norm.weight", w["norm"], GGMLQuantizationType.F32)
    gguf_names = {
        "attn_norm": "attn_norm",
        "mlp_norm": "ffn_norm",
        "q": "attn_q",
        "k": "attn_k",
        "v": "attn_v",
        "o": "attn_output",
        "gate": "ffn_gate",
        "up": "ffn_up",
        "down": "ffn_down",
    }
    heads = {"q": spec.num_heads, "k": spec.num_kv_heads}
    for i in range(spec.num_layers):
        for part, gname in gguf_names.items():
            array = w[f"layers.{i}.{part}"]
            if part in heads:
                array = _permute(array, heads[part])
            qtype = GGMLQuantizationType.F32 if array.ndim == 1 else GGMLQuantizationType.Q4_1
            stored = put(f"blk.{i}.{gname}.weight", array, qtype)
            exact[f"layers.{i}.{part}"] = (
                _unpermute(stored, heads[part]) if part in heads else stored
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return spec, exact


def test_gguf_exports_the_same_function_as_numpy(tmp_path: Path) -> None:
    spec, exact = make_gguf(tmp_path / "tiny.Q4_1.gguf")
    assert (
        cli.main(
            [
                "export-model",
                str(tmp_path / "tiny.Q4_1.gguf"),
                str(tmp_path / "fp32"),
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    card = json.loads((tmp_path / "fp32" / "model.json").read_text())
    assert card["name"] == "tiny" and card["source_quantization"] == "Q4_1"
    np.testing.assert_allclose(
        onnx_logits(tmp_path / "fp32", IDS),
        reference_logits(spec, exact, IDS),
        atol=1e-4,
        rtol=1e-4,
    )
    assert cli.main(["export-model", str(tmp_path / "tiny.Q4_1.gguf"), str(tmp_path / "int4")]) == 0
    quantized = onnx_logits(tmp_path / "int4", IDS)
    assert np.corrcoef(quantized, reference_logits(spec, exact, IDS))[0, 1] > 0.9


def test_gguf_tokenizer_round_trips(tmp_path: Path) -> None:
    make_gguf(tmp_path / "tiny.gguf")
    assert cli.main(["export-model", str(tmp_path / "tiny.gguf"), str(tmp_path / "out")]) == 0
    engine = Engine.load(tmp_path / "out")
    text = "<|im_start|>user\nnaïve café ☕ 42<|im_end|>"
    ids = engine.encode(text)
    assert ids[0] == 1 and ids[-1] == 2
    assert engine.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_q4_1_blocks_move_by_less_than_half_a_step() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((8, 64)).astype(np.float32)
    matrix[0] += 5.0  # a row with only positive values: zero point outside [0, 15]
    raw = quantize(matrix, GGMLQuantizationType.Q4_1)
    exact = dequantize(raw, GGMLQuantizationType.Q4_1).reshape(matrix.shape)
    steps = np.repeat(raw.reshape(8, 2, 20)[..., :2].copy().view(np.float16)[..., 0], 32, axis=1)
    error = np.abs(dequantize_int4(_q4_1_to_int4(raw)) - exact)
    assert (error[1:] <= steps[1:] / 2 + 1e-6).all()
    assert error[0].max() < 0.6  # requantized row: within one int4 step of its range


def test_int4_round_trip_error_is_within_half_a_step() -> None:
    matrix = np.random.default_rng(1).standard_normal((16, 96)).astype(np.float32)
    q = quantize_int4(matrix)
    error = np.abs(dequantize_int4(q) - matrix).reshape(16, 3, 32)
    assert (error <= q.scales[..., None] / 2 + 1e-6).all()


# --- the command ------------------------------------------------------------------------------


def test_tiny_model_command_writes_a_loadable_folder(tmp_path: Path) -> None:
    assert cli.main(["export-model", "--tiny", str(tmp_path / "tiny"), "--precision", "fp32"]) == 0
    files = {p.name for p in (tmp_path / "tiny").iterdir()}
    assert {
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "chat_template.jinja",
        "model.json",
    } <= files
    card = json.loads((tmp_path / "tiny" / "model.json").read_text())
    assert card.keys() >= CARD_KEYS
    session = ort.InferenceSession(str(tmp_path / "tiny" / "model.onnx"))
    assert [i.name for i in session.get_inputs()][:3] == [
        "input_ids",
        "seqlens_k",
        "total_sequence_length",
    ]
    assert session.get_outputs()[0].name == "logits"


def test_tiny_model_builds_the_same_from_the_same_seed(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    assert cli.main(["export-model", "--tiny", str(tmp_path / "again"), "--precision", "fp32"]) == 0
    data = "model.onnx.data"
    assert (tmp_path / "again" / data).read_bytes() == (tiny_model_dir / data).read_bytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file or folder"),
        (
            lambda p: p.mkdir() or (p / "config.json").write_text('{"model_type": "gpt2"}'),
            "unsupported model_type 'gpt2'",
        ),
        (lambda p: p.mkdir() or (p / "config.json").write_text("{oops"), "config.json: unreadable"),
        (lambda p: p.write_bytes(b"not a gguf"), "expected a .gguf file"),
    ],
)
def test_bad_sources_fail_with_one_line_and_exit_2(
    tmp_path: Path, capsys, make, message: str
) -> None:
    source = tmp_path / "src"
    make(source)
    assert cli.main(["export-model", str(source), str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("export-model: ") and message in last


def test_corrupt_gguf_fails_with_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    assert cli.main(["export-model", str(tmp_path / "bad.gguf"), str(tmp_path / "out")]) == 2
    assert "bad.gguf" in capsys.readouterr().err


def test_bert_folders_go_to_the_bert_exporter(tmp_path: Path, monkeypatch) -> None:
    import tools.export.bert

    calls = []
    monkeypatch.setattr(
        tools.export.bert, "export_bert", lambda src, out, name=None: calls.append(src) or out
    )
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    assert cli.main(["export-model", str(tmp_path / "bert"), str(tmp_path / "out")]) == 0
    assert calls == [tmp_path / "bert"]
