"""How closely an exported folder computes its source: greedy decoding against a reference.

The reference is an fp32 numpy pass over the source's own weights, dequantized by the `gguf`
package (or read from safetensors): the function the checkpoint stands for, computed without
any of the export's block conversions. `edgecollab export-model` runs `check_export` on two
short built-in prompts; `python -m tools.export.check FOLDER SOURCE` runs longer ones, and with
`--llama` also compares with llama.cpp greedy decoding on the same GGUF (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.export.source import ModelSource, as_float

# Built into export-model: short and quick (two prompts, 16 new tokens each).
QUICK_PROMPTS = ("def is_prime(n):", "The capital of France is")
# For `python -m tools.export.check`: code, a fact, a word problem, prose (chat-formatted).
PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of Australia, and why was it chosen?",
    "A shop sells pens at 3 dollars each. Ana buys 7 pens and pays with a 50 dollar note. "
    "How much change does she get? Explain step by step.",
    "Explain in a few sentences what a hash table is.",
)


@dataclass
class Agreement:
    """Greedy tokens of the export against the reference's choices on the same sequences."""

    tokens: int = 0  # positions compared (teacher-forced on the export's greedy output)
    agreed: int = 0  # where the reference's argmax is the export's token
    prefix: list[int] | None = None  # per prompt: tokens until the first disagreement
    max_logit_diff: float = 0.0
    mean_logit_diff: float = 0.0

    @property
    def rate(self) -> float:
        return self.agreed / self.tokens if self.tokens else 1.0

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "agreed": self.agreed,
            "agreement": round(self.rate, 4),
            "agreed_prefix": self.prefix,
            "max_logit_diff": round(self.max_logit_diff, 4),
            "mean_logit_diff": round(self.mean_logit_diff, 4),
        }


def reference_logits(
    model: ModelSource, sequences: list[list[int]], starts: list[int] | None = None
) -> list[np.ndarray]:
    """Logits [len - start, vocab] from position `start` on in each sequence (default: all),
    fp32 numpy, layer by layer.

    Each weight is dequantized once for all sequences and dropped after its layer, so memory
    stays at one layer's worth of fp32 weights (plus the embedding rows and the LM head).
    """
    spec, weights = model.spec, model.weights
    embed = weights("embed")
    if hasattr(embed, "rows"):
        xs = [embed.rows(ids) for ids in sequences]
    else:
        table = as_float(embed)
        xs = [table[np.asarray(ids)] for ids in sequences]
    ropes = [_rope(spec, len(ids)) for ids in sequences]
    group = spec.num_heads // spec.num_kv_heads
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        w = {n: as_float(weights(p + n)) for n in ("q", "k", "v", "o", "gate", "up", "down")}
        norms = {n: as_float(weights(p + n)) for n in ("attn_norm", "mlp_norm")}
        bias = {n: as_float(weights(f"{p}{n}_bias")) if spec.attention_bias else 0 for n in "qkv"}
        for j, x in enumerate(xs):
            n = len(x)
            h = _rms(x, norms["attn_norm"], spec.rms_eps)
            q, k, v = (h @ w[c].T + bias[c] for c in "qkv")
            q = _rotate(q.reshape(n, spec.num_heads, -1), *ropes[j], spec.rotary_interleaved)
            k = _rotate(k.reshape(n, spec.num_kv_heads, -1), *ropes[j], spec.rotary_interleaved)
            k = np.repeat(k.transpose(1, 0, 2), group, 0)
            v = np.repeat(v.reshape(n, spec.num_kv_heads, -1).transpose(1, 0, 2), group, 0)
            scores = q.transpose(1, 0, 2) @ k.transpose(0, 2, 1) / np.sqrt(spec.head_dim)
            scores += np.triu(np.full((n, n), -np.inf, np.float32), 1)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            attn = (probs / probs.sum(-1, keepdims=True)) @ v
            x = x + attn.transpose(1, 0, 2).reshape(n, -1) @ w["o"].T
            h = _rms(x, norms["mlp_norm"], spec.rms_eps)
            gate = h @ w["gate"].T
            xs[j] = x + (gate / (1 + np.exp(-gate)) * (h @ w["up"].T)) @ w["down"].T
        del w
    norm = as_float(weights("norm"))
    try:
        head = weights("lm_head")
    except KeyError:
        head = embed
    head = as_float(head)
    starts = starts or [0] * len(xs)
    return [
        _rms(x[start:], norm, spec.rms_eps) @ head.T for x, start in zip(xs, starts, strict=True)
    ]


@contextlib.contextmanager
def _blas_threads(n: int):
    """numpy's OpenBLAS on `n` threads meanwhile (where it can be found; else as it is).

    Its idle threads spin: on a 2-core box other processes keep busy, two threads ran these
    small products ~20x slower than one.
    """
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        maps = []
    paths = {line.split()[-1] for line in maps if "openblas" in line}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get and put:
                before = get()
                put(n)
                try:
                    yield
                finally:
                    put(before)
                return
    yield


def _rms(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gain


def _rope(spec, n: int) -> tuple[np.ndarray, np.ndarray]:
    half = spec.head_dim // 2
    inv = spec.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    angles = np.outer(np.arange(n), inv)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rotary on [n, heads, head_dim]: halves (HF) or adjacent pairs (llama.cpp's llama)."""
    cos, sin = cos[:, None], sin[:, None]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def greedy(folder: Path, prompts: list[list[int]], new_tokens: int, *, threads=None):
    """The exported folder's greedy tokens and the logits it chose them from, per prompt."""
    from services.worker.engine import DecoderRunner, Engine

    engine = Engine.load(folder, threads=threads)
    stops = engine.stop_ids
    results = []
    for ids in prompts:
        runner = DecoderRunner(engine, slots=1, capacity=len(ids) + new_tokens + 1)
        logits = [runner.prefill(0, np.array(ids), 0).copy()]
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < new_tokens and tokens[-1] not in stops:
            step = runner.decode(np.array([tokens[-1]]), np.array([len(ids) + len(tokens) - 1]))
            logits.append(step[0].copy())
            tokens.append(int(logits[-1].argmax()))
        results.append((tokens, np.stack(logits)))
    return engine, results


def compare(model: ModelSource, prompts: list[list[int]], runs) -> Agreement:
    """Teacher-forced: the reference sees prompt + the export's tokens and picks at each step."""
    sequences = [ids + tokens[:-1] for ids, (tokens, _) in zip(prompts, runs, strict=True)]
    with _blas_threads(1):
        refs = reference_logits(model, sequences, [len(ids) - 1 for ids in prompts])
    result, diffs = Agreement(prefix=[]), []
    for (tokens, logits), ref in zip(runs, refs, strict=True):
        same = ref.argmax(-1) == np.array(tokens)
        result.tokens += len(tokens)
        result.agreed += int(same.sum())
        result.prefix.append(int(np.argmin(same)) if not same.all() else len(tokens))
        diff = np.abs(ref - logits).max(-1)
        diffs.append(diff)
    diffs = np.concatenate(diffs)
    result.max_logit_diff, result.mean_logit_diff = float(diffs.max()), float(diffs.mean())
    return result


def check_export(model: ModelSource, folder: Path, *, say=print, new_tokens: int = 16) -> dict:
    """The built-in check of export-model: prints the agreement and writes it into model.json."""
    started = time.perf_counter()
    card_path = Path(folder) / "model.json"
    card = json.loads(card_path.read_text())
    tokenizer = model.tokenizer
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids for p in QUICK_PROMPTS]
    if card.get("add_bos_token") and card.get("bos_token_id") is not None:
        prompts = [[card["bos_token_id"], *ids] for ids in prompts]
    engine, runs = greedy(folder, prompts, new_tokens)
    del engine  # its memory back before the reference's
    agreement = compare(model, prompts, runs)
    check = {
        "reference": "fp32 numpy over the source's dequantized weights",
        "prompts": list(QUICK_PROMPTS),
        **agreement.as_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    card["check"] = check
    card_path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    say(
        f"check: {agreement.agreed}/{agreement.tokens} greedy tokens agree with an fp32 pass "
        f"over the source's weights (max logit difference {agreement.max_logit_diff:.3f}) "
        f"in {check['seconds']} s"
    )
    return check


def llama_greedy(gguf: Path, prompts: list[list[int]], new_tokens: int, *, threads: int = 2):
    """llama.cpp's greedy tokens on the same prompts (repacking off, see docs/worker.md)."""
    import llama_cpp

    defaults = llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False  # the AMX weight repacking crashes on some CPUs here
        return p

    llama_cpp.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(
            model_path=str(gguf), n_threads=threads, n_ctx=2048, logits_all=False, verbose=False
        )
    finally:
        llama_cpp.llama_model_default_params = defaults
    eos = {llm.token_eos(), *(t for t in (llm.tokenize(b"<|im_end|>", special=True)) if t)}
    outputs, rates = [], []
    for ids in prompts:
        llm.reset()
        tokens, started = [], None
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            started = started or time.perf_counter()
            tokens.append(int(token))
            if token in eos or len(tokens) >= new_tokens:
                break
        if len(tokens) > 1:
            rates.append((len(tokens) - 1) / (time.perf_counter() - started))
        outputs.append(tokens)
    return outputs, rates


def _same_prefix(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export.check", description=__doc__)
    parser.add_argument("folder", type=Path, help="an exported model folder")
    parser.add_argument("source", type=Path, help="the .gguf file or HF folder it came from")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--llama", action="store_true", help="also compare with llama.cpp")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from services.worker.chat import render_prompt
    from tools.export.model import read_source, resolve_source

    args.source = resolve_source(args.source)
    model = read_source(args.source)
    card = json.loads((args.folder / "model.json").read_text())
    tokenizer = model.tokenizer
    prompts = [
        tokenizer.encode(render_prompt(card, p), add_special_tokens=False).ids for p in PROMPTS
    ]
    started = time.perf_counter()
    engine, runs = greedy(args.folder, prompts, args.tokens, threads=args.threads)
    seconds = time.perf_counter() - started
    generated = sum(len(t) for t, _ in runs)
    report = {
        "folder": str(args.folder),
        "prompts": len(prompts),
        "generated": generated,
        "export_tok_s_incl_prefill": round(generated / seconds, 1),
    }
    report["vs_fp32_reference"] = compare(model, prompts, runs).as_dict()
    if args.llama:
        llama, rates = llama_greedy(args.source, prompts, args.tokens, threads=args.threads)
        ours = [t for t, _ in runs]
        prefixes = [_same_prefix(a, b) for a, b in zip(ours, llama, strict=True)]
        report["vs_llama_cpp"] = {
            "same_prefix": prefixes,
            "same_prefix_tokens": sum(prefixes),
            "of": sum(min(len(a), len(b)) for a, b in zip(ours, llama, strict=True)),
            "llama_decode_tok_s": [round(r, 1) for r in rates],
        }
        forced = compare(model, prompts, [(t, np.zeros((len(t), 1))) for t in llama])
        report["llama_vs_fp32_reference"] = {
            "tokens": forced.tokens,
            "agreed": forced.agreed,
            "agreement": round(forced.rate, 4),
            "agreed_prefix": forced.prefix,
        }
    texts = [engine.tokenizer.decode(t) for t, _ in runs]
    report["texts"] = texts
    json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
