"""A llama/qwen2-family decoder as an ONNX graph, built with onnx.helper and numpy alone.

Graph I/O (what `services.worker.engine` binds):
  inputs   input_ids int64 [batch, seq], seqlens_k int32 [batch] (total length - 1 per row),
           total_sequence_length int32 [] (max total length in the batch),
           past.{i}.key / past.{i}.value float32 [batch, kv_heads, max_seq, head_dim]
  outputs  logits float32 [batch, vocab] (last position only),
           present.{i}.key / present.{i}.value (same shape; bind them to the past buffers so
           GroupQueryAttention writes the new entries in place)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tools.export.source import (
    DecoderSpec,
    Quantized,
    Weight,
    Weights,
    as_float,
    as_int4,
    as_int8,
    concat_rows,
    native_bits,
)

# int8 activations in MatMulNBits: the fast CPU path (VNNI). On Qwen2.5-Coder it agrees with
# the source as well as accuracy_level 1 (fp32 activations) does, and int8 weights need it.
ACCURACY_LEVEL = 4
# How matrices are stored: int4 or int8 MatMulNBits for all; "source": each matrix in the
# narrowest width that holds its checkpoint's blocks (source.native_bits); "mixed": int8 where
# that is worth its memory (MIXED_INT8), the checkpoint's width allowing, int4 elsewhere;
# fp32 MatMul. Measured on Qwen2.5-Coder (docs/worker.md): int4 costs the most agreement in
# attention and ffn_down per byte, the least in gate/up and the LM head.
PRECISIONS = ("int4", "mixed", "int8", "source", "fp32")
MIXED_INT8 = ("qkv", "o", "down", "embed")  # the embedding: only the rows in use stay resident
OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


_MS_OPS = {
    "MatMulNBits",
    "GroupQueryAttention",
    "SkipSimplifiedLayerNormalization",
    "GatherBlockQuantized",
}


class _Graph:
    """Collects nodes and initializers while the decoder is laid out."""

    def __init__(self, spec: DecoderSpec, precision: str, accuracy_level: int) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
        self.spec, self.precision, self.accuracy_level = spec, precision, accuracy_level
        self.quantized = precision != "fp32"
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.bits: dict[str, int] = {}  # matrix name → the width it got

    def quantize(self, weight: Weight, name: str) -> Quantized:
        """`weight` in the width the precision gives the matrix `name` (embed, logits, ...)."""
        bits = {"int4": 4, "int8": 8}.get(self.precision) or native_bits(weight)
        if self.precision == "mixed" and name.rsplit(".", 1)[-1] not in MIXED_INT8:
            bits = 4
        return as_int8(weight) if bits == 8 else as_int4(weight)

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.require(array, requirements="C"), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        """Add one node; returns its (first) output name."""
        outputs = [output, *attrs.pop("extra_outputs", [])]
        domain = "com.microsoft" if op in _MS_OPS else ""
        name = f"{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return output

    def linear(
        self, x: str, weight: Weight | Quantized, name: str, bias: np.ndarray | None = None
    ) -> str:
        """x @ weight.T (+ bias): int4/int8 MatMulNBits, or fp32 MatMul."""
        if self.quantized:
            q = weight if hasattr(weight, "bits") else self.quantize(weight, name)
            names = [self.const(f"{name}.{f}", getattr(q, f)) for f in _NBITS_FIELDS]
            if bias is not None:
                names += ["", self.const(name + ".bias", bias.astype(np.float32))]
            return self.nbits(x, names, name, q)
        out = self.node("MatMul", [x, self.const(name + ".weight", as_float(weight).T)], name)
        if bias is None:
            return out
        bias_name = self.const(name + ".bias", bias.astype(np.float32))
        return self.node("Add", [out, bias_name], name + ".biased")

    def nbits(self, x: str, weights: list[str], out: str, q: Quantized) -> str:
        n, k = q.shape
        self.bits[out] = q.bits
        return self.node(
            "MatMulNBits",
            [x, *weights],
            out,
            K=k,
            N=n,
            bits=q.bits,
            block_size=q.block,
            accuracy_level=self.accuracy_level,
        )


_NBITS_FIELDS = ("codes", "scales", "zero_points")


def build_decoder(
    spec: DecoderSpec,
    weights: Weights,
    *,
    precision: str,
    accuracy_level: int = ACCURACY_LEVEL,
    progress=None,
    widths: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """Lay out the whole decoder; `progress(i)` is called after each layer.

    `widths`, when given, receives the bit width of every quantized matrix (by node name).
    """
    g = _Graph(spec, precision, accuracy_level)
    hidden, tied = _embedding(g, weights("embed"))
    cos, sin = _rope_tables(spec)
    g.const("cos_cache", cos)
    g.const("sin_cache", sin)
    residual, out = hidden, None
    for i in range(spec.num_layers):
        out, residual = _layer(g, weights, i, out, residual)
        if progress:
            progress(i)
    normed, _ = _norm(g, out, residual, weights("norm"), "norm")
    last_index = g.const("last_index", np.array(-1, np.int64))
    _lm_head(g, weights, g.node("Gather", [normed, last_index], "last", axis=1), tied)
    if widths is not None:
        widths.update(g.bits)
    return _model(g)


def _embedding(g: _Graph, embed: Weight) -> tuple[str, Quantized | None]:
    """Token embeddings; quantized also the table, which a tied LM head reuses."""
    if not g.quantized:
        return g.node(
            "Gather", [g.const("embed.weight", as_float(embed)), "input_ids"], "embed"
        ), None
    q = g.quantize(embed, "embed")
    vocab, hidden = q.shape
    g.bits["embed"] = q.bits
    codes = q.codes.reshape(vocab, hidden * q.bits // 8)
    inputs = [g.const("embed.codes", codes), "input_ids"]
    inputs += [g.const("embed.scales", q.scales), g.const("embed.zero_points", q.zero_points)]
    out = g.node(
        "GatherBlockQuantized",
        inputs,
        "embed",
        bits=q.bits,
        block_size=q.block,
        gather_axis=0,
        quantize_axis=1,
    )
    return out, q


def _lm_head(g: _Graph, weights: Weights, last: str, tied: Quantized | None) -> None:
    """Logits of the last position: own head, or the embedding table (tied), quantized or fp32."""
    try:
        g.linear(last, weights("lm_head"), "logits")
    except KeyError:
        if tied is not None:  # MatMulNBits wants the codes 3-D; scales and zero points are shared
            names = [g.const("lm_head.codes", tied.codes), "embed.scales", "embed.zero_points"]
            g.nbits(last, names, "logits", tied)
        else:
            g.node("Gemm", [last, "embed.weight"], "logits", transB=1)


def _layer(g: _Graph, weights: Weights, i: int, prev: str | None, residual: str) -> tuple[str, str]:
    """One pre-norm block; returns (its output, the residual stream before it is added)."""
    spec, p = g.spec, f"layers.{i}"
    x, residual = _norm(g, prev, residual, weights(f"{p}.attn_norm"), f"{p}.attn_norm")
    parts = [weights(f"{p}.{n}") for n in "qkv"]
    if g.quantized:
        qkv_weight = concat_rows([g.quantize(w, f"{p}.qkv") for w in parts])
    else:
        qkv_weight = np.concatenate([as_float(w) for w in parts])
    bias = None
    if spec.attention_bias:
        bias = np.concatenate([as_float(weights(f"{p}.{n}_bias")) for n in "qkv"])
    qkv = g.linear(x, qkv_weight, f"{p}.qkv", bias)
    cache = [f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_sequence_length"]
    attn = g.node(
        "GroupQueryAttention",
        [qkv, "", "", *cache, "cos_cache", "sin_cache"],
        f"{p}.attn",
        extra_outputs=[f"present.{i}.key", f"present.{i}.value"],
        num_heads=spec.num_heads,
        kv_num_heads=spec.num_kv_heads,
        do_rotary=1,
        rotary_interleaved=int(spec.rotary_interleaved),
    )
    o = g.linear(attn, weights(f"{p}.o"), f"{p}.o")
    x, residual = _norm(g, o, residual, weights(f"{p}.mlp_norm"), f"{p}.mlp_norm")
    gate = g.linear(x, weights(f"{p}.gate"), f"{p}.gate")
    up = g.linear(x, weights(f"{p}.up"), f"{p}.up")
    silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
    act = g.node("Mul", [silu, up], f"{p}.act")
    return g.linear(act, weights(f"{p}.down"), f"{p}.down"), residual


def _norm(g: _Graph, x: str | None, residual: str, weight: Weight, name: str) -> tuple[str, str]:
    """RMSNorm of x + residual (of the residual alone before layer 0); (normed, new residual)."""
    w = g.const(name + ".weight", as_float(weight))
    eps = g.spec.rms_eps
    if x is None:
        return g.node(
            "SimplifiedLayerNormalization", [residual, w], name, axis=-1, epsilon=eps
        ), residual
    normed = g.node(
        "SkipSimplifiedLayerNormalization",
        [x, residual, w],
        name,
        extra_outputs=["", "", name + ".sum"],
        epsilon=eps,
    )
    return normed, name + ".sum"


def _rope_tables(spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    exponents = np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim
    angles = np.outer(np.arange(spec.context_length, dtype=np.float64), spec.rope_theta**-exponents)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _model(g: _Graph) -> onnx.ModelProto:
    spec = g.spec
    cache: list[str | int] = ["batch", spec.num_kv_heads, "max_seq", spec.head_dim]
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", spec.vocab_size])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kind}", f32, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, cache))
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
    # IR 10: what onnxruntime >= 1.20 reads (onnx 1.23 would write 14 by default).
    return helper.make_model(graph, opset_imports=OPSET, producer_name="edgecollab", ir_version=10)
