"""Read a llama/qwen2 GGUF file with the `gguf` package: spec, weights, tokenizer, chat template."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from tools.export.source import DecoderSpec, ExportError, Int4Matrix, ModelSource, pack_nibbles

# GGUF tensor names → canonical names (see tools.export.graph.Weights).
_GLOBAL = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "attn_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}

# llama.cpp pre-tokenizer names → the split regexes it applies before byte-level BPE.
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_QWEN2 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LLAMA3 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_PRE_TOKENIZERS = {
    "gpt2": [_GPT2],
    "default": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "qwen2": [_QWEN2],
    "llama-bpe": [_LLAMA3],
}
_CONTROL, _USER_DEFINED = 3, 4


def read_gguf(path: Path) -> ModelSource:
    """Open a GGUF file; weights are read lazily from the memory-mapped file."""
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable GGUF file ({exc})") from exc
    meta = _Meta(reader)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ExportError(f"{path}: unsupported architecture {arch!r} (llama or qwen2 only)")
    tensors = {_canonical(t.name): t for t in reader.tensors}
    spec = _spec(meta, arch, tensors)
    template = meta.get("tokenizer.chat_template", None)
    return ModelSource(
        name=re.sub(r"[.-](I?Q\d\w*|F16|F32|BF16)$", "", path.stem, flags=re.IGNORECASE),
        spec=spec,
        weights=lambda name: _weight(tensors[name]),
        tokenizer=_tokenizer(meta, path),
        chat_template=template,
        bos_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_ids=tuple(
            meta.get(f"tokenizer.ggml.{key}_token_id", None)
            for key in ("eos", "eot")
            if meta.get(f"tokenizer.ggml.{key}_token_id", None) is not None
        ),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        parameters=sum(int(np.prod(t.shape)) for t in reader.tensors),
        source_quantization=_dominant_type(reader),
    )


class _Meta:
    def __init__(self, reader: GGUFReader) -> None:
        self.fields = reader.fields

    def get(self, key: str, default=KeyError):
        if key in self.fields:
            return self.fields[key].contents()
        if default is KeyError:
            raise ExportError(f"GGUF metadata has no {key!r}")
        return default


def _canonical(name: str) -> str:
    base, _, kind = name.rpartition(".")
    if base.startswith("blk."):
        _, index, part = base.split(".", 2)
        suffix = "_bias" if kind == "bias" else ""
        return f"layers.{index}.{_LAYER.get(part, part)}{suffix}"
    return _GLOBAL.get(base, base)


def _spec(meta: _Meta, arch: str, tensors: dict) -> DecoderSpec:
    hidden = meta.get(f"{arch}.embedding_length")
    heads = meta.get(f"{arch}.attention.head_count")
    return DecoderSpec(
        architecture=arch,
        vocab_size=int(tensors["embed"].shape[1]),
        hidden_size=hidden,
        intermediate_size=meta.get(f"{arch}.feed_forward_length"),
        num_layers=meta.get(f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=meta.get(f"{arch}.rope.dimension_count", hidden // heads),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        context_length=meta.get(f"{arch}.context_length"),
        attention_bias="layers.0.q_bias" in tensors,
        # llama.cpp's converter permutes llama Q/K rows for adjacent-pair (GPT-J) rotary.
        rotary_interleaved=arch == "llama",
    )


def _weight(tensor) -> np.ndarray | Q4_1Matrix:
    """A GGUF tensor as [out, in]; Q4_1 stays 4-bit until the graph says what it needs."""
    if tensor.tensor_type == GGMLQuantizationType.Q4_1:
        return Q4_1Matrix(np.asarray(tensor.data))
    return dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)


@dataclass(frozen=True)
class Q4_1Matrix:
    """GGUF Q4_1 rows (blocks of 32: f16 step d, f16 minimum m, 16 bytes of 4-bit codes)."""

    raw: np.ndarray  # uint8 [N, K/32 * 20]

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.raw.shape[1] // 20 * 32

    def to_float(self) -> np.ndarray:
        return dequantize(self.raw, GGMLQuantizationType.Q4_1).astype(np.float32)

    def to_int4(self) -> Int4Matrix:
        return _q4_1_to_int4(self.raw)


def _q4_1_to_int4(raw: np.ndarray) -> Int4Matrix:
    """Q4_1 blocks (w = d*q + m) to MatMulNBits blocks (w = s*(q - z)) with s = d, z = round(-m/d).

    Where -m/d lies in [0, 15] (almost every block) the codes are kept and the block moves by
    less than d/2; elsewhere the block is requantized from its float values.
    """
    rows, nbytes = raw.shape
    blocks = raw.reshape(rows, nbytes // 20, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1)
    safe_d = np.where(d == 0, 1.0, d)
    zero = np.round(-m / safe_d)
    ok = (zero >= 0) & (zero <= 15) & (d != 0)
    if not ok.all():
        codes, safe_d, zero = _requantize_blocks(codes, d, m, ok, safe_d, zero)
    return Int4Matrix(
        pack_nibbles(codes), safe_d.astype(np.float32), pack_nibbles(zero.astype(np.uint8))
    )


def _requantize_blocks(codes, d, m, ok, scale, zero):
    """RTN-requantize the Q4_1 blocks whose zero point falls outside [0, 15]."""
    values = codes[~ok].astype(np.float32) * d[~ok][:, None] + m[~ok][:, None]
    lo = np.minimum(values.min(axis=1), 0.0)
    hi = np.maximum(values.max(axis=1), 0.0)
    s = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
    z = np.clip(np.round(-lo / s), 0, 15)
    codes, scale, zero = codes.copy(), scale.copy(), zero.copy()
    codes[~ok] = np.clip(np.round(values / s[:, None]) + z[:, None], 0, 15).astype(np.uint8)
    scale[~ok], zero[~ok] = s, z
    return codes, scale, zero


def _dominant_type(reader: GGUFReader) -> str:
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(np.prod(t.shape))
    return max(counts, key=counts.__getitem__)


def _tokenizer(meta: _Meta, path: Path) -> Tokenizer:
    """Byte-level BPE rebuilt from the GGUF vocabulary, merges and pre-tokenizer name."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ExportError(f"{path}: only byte-level BPE (gpt2-style) GGUF tokenizers are supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ExportError(f"{path}: unsupported pre-tokenizer {pre!r}")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(
        models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False)
    )
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_TOKENIZERS[pre]]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    kinds = meta.get("tokenizer.ggml.token_type")
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, kinds, strict=True)
            if k == _CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, normalized=False)
            for t, k in zip(tokens, kinds, strict=True)
            if k == _USER_DEFINED
        ]
    )
    return tokenizer
