"""Read a llama/qwen2 GGUF file with the `gguf` package: spec, weights, tokenizer, chat template."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from tools.export.source import (
    DecoderSpec,
    ExportError,
    Int4Matrix,
    Int8Matrix,
    ModelSource,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
)

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
        source_quantization=_file_type(meta) or _dominant_type(reader),
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


def _weight(tensor) -> np.ndarray | GGUFMatrix:
    """A GGUF tensor as [out, in]; block-quantized matrices stay in their blocks until the graph
    says what it needs (float, int4 or int8)."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype in _BLOCKS and len(tensor.shape) == 2:
        return GGUFMatrix(np.asarray(tensor.data), qtype)
    return dequantize(np.asarray(tensor.data), qtype).astype(np.float32)


_T = GGMLQuantizationType
# bytes a block, weights a block, weights a sub-block, highest code, MatMulNBits width that holds it
_BLOCKS = {
    _T.Q4_0: (18, 32, 32, 7, 4),
    _T.Q4_1: (20, 32, 32, 15, 8),
    _T.Q5_0: (22, 32, 32, 15, 8),
    _T.Q5_1: (24, 32, 32, 31, 8),
    _T.Q8_0: (34, 32, 32, 127, 8),
    _T.Q4_K: (144, 256, 32, 15, 8),
    _T.Q5_K: (176, 256, 32, 31, 8),
    _T.Q6_K: (210, 256, 16, 31, 8),
}


@dataclass(frozen=True)
class GGUFMatrix:
    """A block-quantized GGUF matrix: each sub-block of its rows holds w = step * code + low.

    `to_int8` keeps every code and step (Q8_0, Q5_0, Q4_0, Q6_K: exact, Q6_K in blocks of 16;
    Q4_1/Q4_K/Q5_1/Q5_K: the minimum rounded to 1/16 of a step or finer). `to_int4` keeps them
    where 4 bits hold the codes (Q4_0 exact, Q4_1/Q4_K with the minimum rounded to a whole
    step, like `_q4_1_to_int4`) and requantizes the rest round-to-nearest in blocks of 32.
    """

    raw: np.ndarray  # uint8 [N, bytes of a row]
    qtype: GGMLQuantizationType

    @property
    def shape(self) -> tuple[int, int]:
        size, weights = _BLOCKS[self.qtype][:2]
        return self.raw.shape[0], self.raw.shape[1] // size * weights

    @property
    def native_bits(self) -> int:
        return _BLOCKS[self.qtype][4]

    def to_float(self) -> np.ndarray:
        if self.qtype not in (_T.Q8_0, _T.Q5_0):
            return (
                dequantize(self.raw, self.qtype).astype(np.float32, copy=False).reshape(self.shape)
            )
        # Q8_0 and Q5_0 directly, a few thousand rows at a time: ~2x the gguf package's speed.
        out = np.empty(self.shape, np.float32)
        for start in range(0, self.shape[0], 4096):
            out[start : start + 4096] = _small_blocks_to_float(
                self.raw[start : start + 4096], self.qtype
            )
        return out

    def rows(self, ids) -> np.ndarray:
        """Rows `ids` as float (an embedding lookup without dequantizing the whole table)."""
        return dequantize(self.raw[np.asarray(ids)], self.qtype).astype(np.float32)

    def steps(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(step [N, K/sub], low [N, K/sub] or None where it is 0, integer codes [N, K])."""
        n = self.raw.shape[0]
        size, _, sub = _BLOCKS[self.qtype][:3]
        blocks = self.raw.reshape(n, -1, size)

        def f16(start: int) -> np.ndarray:
            return blocks[..., start : start + 2].copy().view(np.float16)[..., 0].astype(np.float32)

        low = None
        if self.qtype in (_T.Q4_0, _T.Q5_0, _T.Q8_0):
            step = f16(0)
        elif self.qtype in (_T.Q4_1, _T.Q5_1):
            step, low = f16(0), f16(2)
        elif self.qtype == _T.Q6_K:
            scales = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)
            step = (f16(208)[..., None] * scales).reshape(n, -1)
        else:  # Q4_K, Q5_K: 6-bit scales and minimums packed in 12 bytes
            sc, mn = _k_scales(blocks[..., 4:16])
            step = (f16(0)[..., None] * sc).reshape(n, -1)
            low = (-f16(2)[..., None] * mn).reshape(n, -1)
        if self.qtype == _T.Q8_0:
            codes = blocks[..., 2:].copy().view(np.int8).reshape(n, -1).astype(np.int16)
            return step, low, codes
        values = self.to_float().reshape(n, -1, sub)
        if low is not None:
            values = values - low[..., None]
        safe = np.where(step == 0, 1.0, step)
        codes = np.where(step[..., None] == 0, 0, np.round(values / safe[..., None]))
        return step, low, codes.astype(np.int16).reshape(n, -1)

    def to_int8(self) -> Int8Matrix:
        step, low, codes = self.steps()
        n, sub = step.shape[0], _BLOCKS[self.qtype][2]
        codes = codes.reshape(n, -1, sub)
        if low is None:  # symmetric: w = step * code, codes within [-128, 127]
            zero = np.full(step.shape, 128, np.uint8)
            return Int8Matrix((codes + 128).astype(np.uint8), step, zero)
        return _asymmetric_int8(step, low, codes, _BLOCKS[self.qtype][3])

    def to_int4(self) -> Int4Matrix:
        if self.qtype == _T.Q4_1:
            return _q4_1_to_int4(self.raw)
        if self.qtype not in (_T.Q4_0, _T.Q4_K):
            return quantize_int4(self.to_float())
        step, low, codes = self.steps()
        codes = codes.reshape(*step.shape, -1)
        if low is None:  # Q4_0: w = d * q with q in [-8, 7]
            zero = np.full(step.shape, 8, np.uint8)
            return Int4Matrix(pack_nibbles((codes + 8).astype(np.uint8)), step, pack_nibbles(zero))
        return _affine_to_int4(codes.astype(np.uint8), step, low)


def _small_blocks_to_float(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Q8_0 (w = d * q) or Q5_0 (w = d * (q - 16), 4 low bits in qs, the 5th in qh) rows."""
    size = 34 if qtype == _T.Q8_0 else 22
    blocks = raw.reshape(raw.shape[0], -1, size)
    step = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    if qtype == _T.Q8_0:
        return (blocks[..., 2:].view(np.int8) * step).reshape(raw.shape[0], -1)
    high = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little") << 4
    qs = blocks[..., 6:]
    codes = (np.concatenate([qs & 15, qs >> 4], axis=-1) | high).astype(np.float32)
    return ((codes - 16) * step).reshape(raw.shape[0], -1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and minimums of a Q4_K/Q5_K super-block (ggml's get_scale_min_k4)."""
    q = packed.astype(np.uint8)
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 15) | ((q[..., 0:4] >> 6) << 4)], -1)
    mn = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], -1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _asymmetric_int8(step, low, codes, top: int) -> Int8Matrix:
    """w = step * q + low (q in [0, top]) as s * (c - z): s = step / k, c = k * q + offset.

    Each block takes the largest k in 16, 8, 4, 2, 1 for which codes and zero point fit in a
    byte, so the minimum is rounded to step / (2k) at most; blocks where none fits (a minimum
    hundreds of steps away from zero, or a zero step) are requantized round-to-nearest.
    """
    safe = np.where(step == 0, 1.0, step)
    ratio = np.where(step == 0, 0.0, -low / safe)  # the zero point in steps
    chosen = np.zeros(step.shape, np.float32)
    for k in (1, 2, 4, 8, 16):
        if k * top > 255:
            continue
        zero = np.round(k * ratio)
        offset = np.maximum(0, -zero)
        fits = (zero + offset <= 255) & (k * top + offset <= 255)
        chosen = np.where(fits, k, chosen)
    k = np.where(chosen == 0, 1, chosen)
    zero = np.round(k * ratio)
    offset = np.maximum(0, -zero)
    out = Int8Matrix(
        np.clip(k[..., None] * codes + offset[..., None], 0, 255).astype(np.uint8),
        (step / k).astype(np.float32),
        np.clip(zero + offset, 0, 255).astype(np.uint8),
    )
    bad = (chosen == 0) | ((step == 0) & (low != 0))  # a zero step: every weight is the minimum
    if bad.any():
        values = codes[bad].astype(np.float32) * step[bad][:, None] + low[bad][:, None]
        fix = quantize_int8(values, block=values.shape[1])
        out.codes[bad], out.scales[bad], out.zero_points[bad] = (
            fix.codes[:, 0],
            fix.scales[:, 0],
            fix.zero_points[:, 0],
        )
    return out


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
    return _affine_to_int4(np.concatenate([qs & 15, qs >> 4], axis=-1), d, m)


def _affine_to_int4(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> Int4Matrix:
    """Blocks of 32 holding w = d*q + m (q in [0, 15]) as s = d, z = round(-m/d) (see above)."""
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


def _file_type(meta: _Meta) -> str | None:
    """llama.cpp's name for the file's mix (general.file_type), e.g. Q4_K_M, Q4_1."""
    try:
        return LlamaFileType(meta.get("general.file_type", None)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return None


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
