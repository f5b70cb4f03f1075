"""What an exporter reads from a checkpoint, whatever its format, and the int4 weight layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

BLOCK = 32  # weights are quantized in blocks of 32 along K, like GGUF's Q4_0/Q4_1/Q5_0/Q8_0


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
    """An [N, K] matrix in MatMulNBits layout: 4-bit codes in blocks (of 32) along K."""

    codes: np.ndarray  # uint8 [N, K/block, block/2], two codes per byte, low nibble first
    scales: np.ndarray  # float32 [N, K/block]
    zero_points: np.ndarray  # uint8 [N, ceil(K/block / 2)], packed like the codes
    bits = 4

    @property
    def block(self) -> int:
        return self.codes.shape[2] * 2

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * self.block

    # Weights by canonical name: embed, norm, lm_head (absent when tied), layers.{i}.{attn_norm,
    # q, k, v, o, q_bias, k_bias, v_bias, mlp_norm, gate, up, down}. Matrices are [out, in].
    def to_float(self) -> np.ndarray:
        return dequantize_int4(self)

    def to_int4(self) -> Int4Matrix:
        return self

    def to_int8(self) -> Int8Matrix:
        codes = np.stack([self.codes & 15, self.codes >> 4], axis=-1).reshape(
            *self.scales.shape, -1
        )
        zero = np.stack([self.zero_points & 15, self.zero_points >> 4], axis=-1)
        zero = zero.reshape(zero.shape[0], -1)[:, : self.scales.shape[1]]
        return Int8Matrix(codes, self.scales, zero)


@dataclass(frozen=True)
class Int8Matrix:
    """An [N, K] matrix in 8-bit MatMulNBits layout: one code a byte, in blocks along K."""

    codes: np.ndarray  # uint8 [N, K/block, block]
    scales: np.ndarray  # float32 [N, K/block]
    zero_points: np.ndarray  # uint8 [N, K/block]
    bits = 8

    @property
    def block(self) -> int:
        return self.codes.shape[2]

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * self.block

    def to_float(self) -> np.ndarray:
        values = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[
            ..., None
        ]
        return values.reshape(self.shape)

    def to_int4(self) -> Int4Matrix:
        return quantize_int4(self.to_float())

    def to_int8(self) -> Int8Matrix:
        return self


class QuantizedMatrix(Protocol):
    """A [N, K] matrix stored quantized by its checkpoint, convertible either way."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def to_float(self) -> np.ndarray: ...

    def to_int4(self) -> Int4Matrix: ...

    def to_int8(self) -> Int8Matrix: ...


Quantized = Int4Matrix | Int8Matrix
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


def quantize_int8(matrix: np.ndarray, block: int = BLOCK) -> Int8Matrix:
    """Round-to-nearest symmetric int8 per block (zero point 128): w = s * (code - 128)."""
    n, k = matrix.shape
    blocks = matrix.astype(np.float32).reshape(n, k // block, block)
    scales = np.abs(blocks).max(axis=2) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.round(blocks / scales[..., None]), -128, 127) + 128
    zero = np.full(scales.shape, 128, np.uint8)
    return Int8Matrix(codes.astype(np.uint8), scales.astype(np.float32), zero)


def dequantize_int4(matrix: Int4Matrix) -> np.ndarray:
    """The float [N, K] matrix an Int4Matrix stands for."""
    codes = np.stack([matrix.codes & 15, matrix.codes >> 4], axis=-1).reshape(
        *matrix.scales.shape, -1
    )
    zero = np.stack([matrix.zero_points & 15, matrix.zero_points >> 4], axis=-1)
    zero = zero.reshape(zero.shape[0], -1)[:, : matrix.scales.shape[1]]
    values = (codes.astype(np.float32) - zero[..., None]) * matrix.scales[..., None]
    return values.reshape(matrix.shape)


def concat_rows(parts: list[Quantized]) -> Quantized:
    """Stack quantized matrices along N (the fused QKV projection); one layout for all.

    Parts of different widths or blocks are all widened to 8 bits in the smallest block.
    """
    if len({(p.bits, p.block) for p in parts}) > 1:
        block = min(p.block for p in parts)
        parts = [_reblock(p.to_int8(), block) for p in parts]
    kind = type(parts[0])
    return kind(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("codes", "scales", "zero_points")
        )
    )


def _reblock(matrix: Int8Matrix, block: int) -> Int8Matrix:
    """The same values in smaller blocks (each block's scale and zero point repeated)."""
    if matrix.block == block:
        return matrix
    n, blocks, size = matrix.codes.shape
    split = size // block
    return Int8Matrix(
        matrix.codes.reshape(n, blocks * split, block),
        np.repeat(matrix.scales, split, axis=1),
        np.repeat(matrix.zero_points, split, axis=1),
    )


def as_float(weight: Weight) -> np.ndarray:
    return weight.astype(np.float32) if isinstance(weight, np.ndarray) else weight.to_float()


def as_int4(weight: Weight) -> Int4Matrix:
    return quantize_int4(weight) if isinstance(weight, np.ndarray) else weight.to_int4()


def as_int8(weight: Weight) -> Int8Matrix:
    return quantize_int8(weight) if isinstance(weight, np.ndarray) else weight.to_int8()


def native_bits(weight: Weight) -> int:
    """The narrowest MatMulNBits width (4 or 8) that holds `weight` as its checkpoint stores it.

    Float checkpoints (and anything without a say) get 4: quantizing them is the export's choice.
    """
    return getattr(weight, "native_bits", 4)


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
