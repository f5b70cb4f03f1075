"""The generation engine: an exported decoder in one onnxruntime session, its tokenizer and card.

`Engine.load` opens a model folder written by `edgecollab export-model`; `DecoderRunner` runs it
over a KV cache that onnxruntime updates in place (GroupQueryAttention with past and present
bound to the same preallocated buffers, one row per request slot).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog
from tokenizers import Tokenizer

from services.core.onnx import ModelError, default_threads, open_session

GRAPH_FORMAT = "edgecollab-decoder/1"  # written by tools.export.model
_CARD_KEYS = ("name", "graph", "context_length", "vocab_size", "num_layers", "num_kv_heads",
              "head_dim")  # fmt: skip

log = structlog.get_logger(__name__)


class Engine:
    """One onnxruntime session over an exported decoder, its tokenizer and its card (model.json)."""

    def __init__(
        self, session: ort.InferenceSession, tokenizer: Tokenizer, card: dict, *, threads: int
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.card = card
        self.threads = threads
        self.provider = session.get_providers()[0]
        self.stop_ids = frozenset(card.get("stop_token_ids") or [])

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        threads: int | None = None,
        provider: str | None = None,
        spinning: bool = False,
    ) -> Engine:
        """Open `folder`; threads default to the physical cores, spinning thread pools off."""
        folder = Path(folder)
        card = _read_card(folder / "model.json")
        tokenizer = _read_tokenizer(
            folder / card.get("files", {}).get("tokenizer", "tokenizer.json")
        )
        threads = threads or default_threads()
        onnx_path = folder / card.get("files", {}).get("onnx", "model.onnx")
        session = open_session(onnx_path, threads=threads, provider=provider, spinning=spinning)
        _release_load_memory(folder)
        engine = cls(session, tokenizer, card, threads=threads)
        log.info("model_loaded", model=card["name"], provider=engine.provider, threads=threads)
        return engine

    @property
    def context_length(self) -> int:
        return int(self.card["context_length"])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it (e.g. <|im_start|>) are honoured."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, led by BOS when the model expects one."""
        bos = self.card.get("bos_token_id")
        prefix = [bos] if self.card.get("add_bos_token") and bos is not None else []
        return prefix + self.encode(text)


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing (not a model folder written by export-model)") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable model card ({exc})") from exc
    missing = [key for key in _CARD_KEYS if not isinstance(card, dict) or key not in card]
    if missing:
        raise ModelError(f"{path}: model card lacks {', '.join(missing)}")
    if card["graph"] != GRAPH_FORMAT:
        raise ModelError(
            f"{path}: graph format {card['graph']!r}, this worker runs {GRAPH_FORMAT!r}"
        )
    return card


def _read_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise ModelError(f"{path}: missing")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception
        raise ModelError(f"{path}: not a tokenizers JSON file ({exc})") from exc


def _release_load_memory(folder: Path) -> None:
    """Give back what loading leaves resident but unused (Linux; ~100 MB for a 0.5B model).

    The heap the tokenizer's JSON parse and the session set-up freed (malloc_trim), and the
    pages of the weights file onnxruntime mapped and read to prepack them: those mappings are
    read-only, so a page still in use (an embedding row) is read back from the file on demand.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    root = str(folder.resolve()) + os.sep
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(root):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(start, end - start, 21)


class DecoderRunner:
    """Runs the decoder over `slots` KV-cache rows of `capacity` tokens, updated in place.

    Rows are independent sequences. The cache is one anonymous mapping without huge pages, so
    memory is committed only for the positions in use and handed back when a slot is released.
    """

    def __init__(self, engine: Engine, *, slots: int, capacity: int) -> None:
        card = engine.card
        self.session, self.slots, self.capacity = engine.session, slots, capacity
        self.vocab = int(card["vocab_size"])
        capacity = -(-capacity // 16) * 16  # rows then start on page boundaries
        shape = (slots, int(card["num_kv_heads"]), capacity, int(card["head_dim"]))
        names = [f"{i}.{kind}" for i in range(int(card["num_layers"])) for kind in ("key", "value")]
        self._memory = mmap.mmap(-1, len(names) * int(np.prod(shape)) * 4)
        # numpy would ask for huge pages: 2 MB committed per (slot, head) on the first write.
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._memory.madvise(mmap.MADV_NOHUGEPAGE)
        flat = np.frombuffer(self._memory, np.float32).reshape(len(names), *shape)
        self.cache = dict(zip(names, flat, strict=True))
        self._ids = np.zeros((slots, 1), np.int64)
        self._seqlens = np.zeros(slots, np.int32)
        self._total = np.zeros((), np.int32)
        self._logits = np.zeros((slots, self.vocab), np.float32)
        self._decode_bindings: dict[int, ort.IOBinding] = {}

    def prefill(self, slot: int, ids: np.ndarray, start: int) -> np.ndarray:
        """Feed prompt tokens `ids` at positions start.. of `slot`; logits of the last one."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1)
        seqlens = np.array([start + ids.shape[1] - 1], np.int32)
        total = np.array(start + ids.shape[1], np.int32)
        logits = np.empty((1, self.vocab), np.float32)
        binding = self.session.io_binding()
        _bind(binding.bind_input, "input_ids", ids, ids.shape)
        _bind(binding.bind_input, "seqlens_k", seqlens, seqlens.shape)
        _bind(binding.bind_input, "total_sequence_length", total, ())
        _bind(binding.bind_output, "logits", logits, logits.shape)
        self._bind_cache(binding, slot, 1)
        self.session.run_with_iobinding(binding)
        return logits[0]

    def release(self, slot: int) -> None:
        """Return the memory of `slot`'s cache rows to the system (they read as zeros again)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            base = np.frombuffer(self._memory, np.uint8).ctypes.data
            for array in self.cache.values():
                start = array[slot].ctypes.data - base
                self._memory.madvise(mmap.MADV_DONTNEED, start, array[slot].nbytes)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One token for each of rows 0..n-1 (token i at position lengths[i]); logits [n, vocab]."""
        rows = len(tokens)
        self._ids[:rows, 0] = tokens
        self._seqlens[:rows] = lengths
        self._total[...] = int(lengths.max()) + 1
        binding = self._decode_bindings.get(rows) or self._decode_binding(rows)
        self.session.run_with_iobinding(binding)
        return self._logits[:rows]

    def _decode_binding(self, rows: int) -> ort.IOBinding:
        binding = self.session.io_binding()
        _bind(binding.bind_input, "input_ids", self._ids, (rows, 1))
        _bind(binding.bind_input, "seqlens_k", self._seqlens, (rows,))
        _bind(binding.bind_input, "total_sequence_length", self._total, ())
        _bind(binding.bind_output, "logits", self._logits, (rows, self.vocab))
        self._bind_cache(binding, 0, rows)
        self._decode_bindings[rows] = binding
        return binding

    def _bind_cache(self, binding: ort.IOBinding, first: int, rows: int) -> None:
        for name, array in self.cache.items():
            shape = (rows, *array.shape[1:])
            pointer = array.ctypes.data + first * array[0].nbytes
            for bind, prefix in ((binding.bind_input, "past."), (binding.bind_output, "present.")):
                bind(prefix + name, "cpu", 0, np.float32, shape, pointer)


def _bind(bind, name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    """Bind the start of a preallocated array; later in-place writes are seen by the next run."""
    bind(name, "cpu", 0, array.dtype, shape, array.ctypes.data)


def measure_tokens_per_s(engine: Engine, *, tokens: int = 48) -> float:
    """Batch-1 greedy decode rate on this machine after a short prompt (well under 2 s)."""
    runner = DecoderRunner(engine, slots=1, capacity=tokens + 64)
    prompt = engine.encode("The edge devices cooperate over the bus to answer")

    def step(token: int, position: int) -> int:
        return int(runner.decode(np.array([token]), np.array([position]))[0].argmax())

    token = step(int(runner.prefill(0, np.array(prompt), 0).argmax()), len(prompt))  # warm-up
    started = time.perf_counter()
    for position in range(len(prompt) + 1, len(prompt) + 1 + tokens):
        token = step(token, position)
    rate = tokens / (time.perf_counter() - started)
    log.info("decode_rate_measured", tokens_per_s=round(rate, 1), threads=engine.threads)
    return rate
