"""Read a local Hugging Face folder of a llama/qwen2 model: config, safetensors, tokenizer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from tools.export.source import DecoderSpec, ExportError, ModelSource

ARCHITECTURES = ("llama", "qwen2")
_LAYER = {  # canonical name → Hugging Face module
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_config(folder: Path) -> dict:
    """config.json of a Hugging Face folder."""
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable ({exc})") from exc


def read_hf(folder: Path) -> ModelSource:
    """Open a llama/qwen2 folder; safetensors are memory-mapped and read tensor by tensor."""
    config = read_config(folder)
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise ExportError(
            f"{folder / 'config.json'}: unsupported model_type {arch!r} (llama or qwen2)"
        )
    if config.get("rope_scaling"):
        raise ExportError(f"{folder / 'config.json'}: rope_scaling is not supported")
    tensors = _open_safetensors(folder)
    tok_config = _read_json(folder / "tokenizer_config.json")
    tokenizer = _read_tokenizer(folder / "tokenizer.json")
    return ModelSource(
        name=folder.resolve().name,
        spec=_spec(config, arch),
        weights=lambda name: tensors[_hf_name(name, config)](),
        tokenizer=tokenizer,
        chat_template=_chat_template(folder, tok_config),
        bos_id=_token_id(tok_config, "bos_token", tokenizer),
        eos_ids=_eos_ids(folder, config, tok_config, tokenizer),
        add_bos=bool(tok_config.get("add_bos_token")),
        parameters=sum(int(np.prod(shape)) for shape in _shapes(folder).values()),
        source_quantization=str(config.get("torch_dtype", "float32")),
    )


def _spec(config: dict, arch: str) -> DecoderSpec:
    heads = config["num_attention_heads"]
    return DecoderSpec(
        architecture=arch,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        context_length=config.get("max_position_embeddings", 2048),
        attention_bias=arch == "qwen2" or bool(config.get("attention_bias")),
    )


def _hf_name(name: str, config: dict) -> str:
    if name == "embed":
        return "model.embed_tokens.weight"
    if name == "norm":
        return "model.norm.weight"
    if name == "lm_head":
        if config.get("tie_word_embeddings", True):
            raise KeyError(name)  # tied: the graph reuses the embedding
        return "lm_head.weight"
    _, index, part = name.split(".", 2)
    kind = "bias" if part.endswith("_bias") else "weight"
    return f"model.layers.{index}.{_LAYER[part.removesuffix('_bias')]}.{kind}"


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no *.safetensors file")
    return files


def _header(path: Path) -> tuple[int, dict]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        try:
            return 8 + size, json.loads(f.read(size))
        except ValueError as exc:
            raise ExportError(f"{path}: corrupt safetensors header") from exc


def _shapes(folder: Path) -> dict[str, list[int]]:
    shapes = {}
    for path in _safetensors_files(folder):
        _, header = _header(path)
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _open_safetensors(folder: Path) -> dict:
    """Tensor name → loader returning float32 (F32, F16 and BF16; BF16 widened by bit shift)."""
    loaders = {}
    for path in _safetensors_files(folder):
        offset, header = _header(path)
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise ExportError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            loaders[name] = _loader(data, offset, info)
    return loaders


def _loader(data: np.memmap, offset: int, info: dict):
    start, end = (offset + o for o in info["data_offsets"])

    def load() -> np.ndarray:
        raw = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    return load


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable ({exc})") from exc


def _read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception
        raise ExportError(f"{path}: missing or not a tokenizers JSON file ({exc})") from exc


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    path = folder / "chat_template.jinja"
    return path.read_text() if path.is_file() else tok_config.get("chat_template")


def _token_id(tok_config: dict, key: str, tokenizer: Tokenizer) -> int | None:
    token = tok_config.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_to_id(token) if token else None


def _eos_ids(folder: Path, config: dict, tok_config: dict, tokenizer: Tokenizer) -> tuple[int, ...]:
    generation = _read_json(folder / "generation_config.json")
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    ids = eos if isinstance(eos, list) else [eos]
    ids.append(_token_id(tok_config, "eos_token", tokenizer))
    return tuple(dict.fromkeys(i for i in ids if i is not None))
