"""What an exporter reads from a checkpoint, whatever its format, and the int4 weight layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

BLOCK = 32  # int4 weights are quantized in blocks of 32 along K, like GGUF's Q4_0/Q4_1


class ExportError(Exception):
    """A checkpoint that cannot be exported; the message names the file and the reason."""


@dataclass(frozen=True)
class DecoderSpec:
    """Shape and numerics of a decoder; what model.json records."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    context_length: int
    attention_bias: bool = False
    rotary_interleaved: bool = False


@dataclass(frozen=True)
class Int4Matrix:
    """An [N, K] matrix in MatMulNBits layout: 4-bit codes in blocks of 32 along K."""

    codes: np.ndarray  # uint8 [N, K/32, 16], two codes per byte, low nibble first
    scales: np.ndarray  # float32 [N, K/32]
    zero_points: np.ndarray  # uint8 [N, ceil(K/32 / 2)], packed like the codes

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * BLOCK

    # Weights by canonical name: embed, norm, lm_head (absent when tied), layers.{i}.{attn_norm,
    # q, k, v, o, q_bias, k_bias, v_bias, mlp_norm, gate, up, down}. Matrices are [out, in].
    def to_float(self) -> np.ndarray:
        return dequantize_int4(self)

    def to_int4(self) -> Int4Matrix:
        return self


class QuantizedMatrix(Protocol):
    """A [N, K] matrix stored quantized by its checkpoint, convertible either way."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def to_float(self) -> np.ndarray: ...

    def to_int4(self) -> Int4Matrix: ...


Weight = np.ndarray | QuantizedMatrix
Weights = Callable[[str], Weight]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack uint8 values < 16 pairwise along the last axis, low nibble first."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def quantize_int4(matrix: np.ndarray) -> Int4Matrix:
    """Round-to-nearest asymmetric int4 per block of 32 (the MatMulNBits RTN scheme)."""
    n, k = matrix.shape
    blocks = matrix.astype(np.float32).reshape(n, k // BLOCK, BLOCK)
    lo = np.minimum(blocks.min(axis=2), 0.0)
    hi = np.maximum(blocks.max(axis=2), 0.0)
    scales = (hi - lo) / 15.0
    scales[scales == 0] = 1.0
    zero = np.clip(np.round(-lo / scales), 0, 15).astype(np.uint8)
    codes = np.clip(np.round(blocks / scales[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return Int4Matrix(pack_nibbles(codes), scales.astype(np.float32), pack_nibbles(zero))


def dequantize_int4(matrix: Int4Matrix) -> np.ndarray:
    """The float [N, K] matrix an Int4Matrix stands for."""
    codes = np.stack([matrix.codes & 15, matrix.codes >> 4], axis=-1).reshape(
        *matrix.scales.shape, -1
    )
    zero = np.stack([matrix.zero_points & 15, matrix.zero_points >> 4], axis=-1)
    zero = zero.reshape(zero.shape[0], -1)[:, : matrix.scales.shape[1]]
    values = (codes.astype(np.float32) - zero[..., None]) * matrix.scales[..., None]
    return values.reshape(matrix.shape)


def concat_rows(parts: list[Weight], *, int4: bool) -> np.ndarray | Int4Matrix:
    """Stack matrices along N (for the fused QKV projection)."""
    if not int4:
        return np.concatenate([as_float(p) for p in parts])
    quantized = [as_int4(p) for p in parts]
    return Int4Matrix(
        *(
            np.concatenate([getattr(q, f) for q in quantized])
            for f in ("codes", "scales", "zero_points")
        )
    )


def as_float(weight: Weight) -> np.ndarray:
    return weight.astype(np.float32) if isinstance(weight, np.ndarray) else weight.to_float()


def as_int4(weight: Weight) -> Int4Matrix:
    return quantize_int4(weight) if isinstance(weight, np.ndarray) else weight.to_int4()


@dataclass(frozen=True)
class ModelSource:
    """A decoder checkpoint opened for export."""

    name: str
    spec: DecoderSpec
    weights: Weights
    tokenizer: Tokenizer
    chat_template: str | None
    bos_id: int | None
    eos_ids: tuple[int, ...]  # every id the checkpoint names as end of sequence
    add_bos: bool
    parameters: int
    source_quantization: str
