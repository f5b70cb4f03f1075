"""`edgecollab bench classify`: Classifier Engine latency and throughput, batch 1 and 32. JSON.

Queries are the shipped test split (cycled); each call is the whole engine (tokenize, MiniLM,
heads, gap and matching against eight agent cards). One run per thread count: 1 and the
number of physical cores. `cpu_ms_per_query` is process CPU time: on a shared, busy machine it
is closer than wall time to what an idle core would take.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.classifier.engine import ClassifierEngine
from services.classifier.matching import AgentInfo
from services.core.logging import configure_logging
from services.core.onnx import default_threads
from tools.common import print_json
from tools.export.packages import ensure_minilm
from tools.train.heads import TEST_PATH, read_examples

TARGET_P50_MS = 15.0  # per query, batch 1, one core (issue 5)
AGENTS = (
    AgentInfo("wearable-1", "sensor", ("health", "vitals")),
    AgentInfo("air-1", "sensor", ("environment", "air")),
    AgentInfo("noise-1", "sensor", ("noise",)),
    AgentInfo("camera-1", "sensor", ("urban_events",)),
    AgentInfo("traffic-1", "sensor", ("traffic",)),
    AgentInfo("slm-general", "worker", ("general",), tokens_per_s=120.0),
    AgentInfo("slm-medical", "worker", ("health",), tokens_per_s=80.0),
    AgentInfo("slm-math", "worker", ("arithmetic",), tokens_per_s=150.0),
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `classify` under `edgecollab bench`."""
    parser = sub.add_parser("classify", help="Classifier Engine queries/s and p50, batch 1 and 32")
    parser.add_argument("--model", type=Path, default=None, help="exported MiniLM folder")
    parser.add_argument("--queries", type=int, default=320, help="queries per measurement")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="default: 1 and physical cores"
    )
    parser.set_defaults(func=bench)


def bench(args: argparse.Namespace) -> int:
    """Measure every thread count at batch 1 and 32; print one JSON object."""
    configure_logging("bench", level="warning")
    model_dir = ensure_minilm(args.model)
    texts = [e.text for e in read_examples(TEST_PATH)]
    texts = (texts * (args.queries // len(texts) + 1))[: args.queries]
    runs = []
    for threads in args.threads or sorted({1, default_threads()}):
        engine = ClassifierEngine.load(model_dir, threads=threads)
        engine.classify_batch(texts[:32], AGENTS)  # warm-up: allocations, kernels
        runs.append({"threads": threads, "batch": 1, **_batch1(engine, texts)})
        runs.append({"threads": threads, "batch": 32, **_batch32(engine, texts)})
    one_core = next(r for r in runs if r["threads"] == 1 and r["batch"] == 1) if runs else None
    tokens = [sum(e.attention_mask) for e in engine.embedder.tokenizer.encode_batch(texts)]
    print_json(
        {
            "bench": "classify",
            "model": engine.embedder.card.name,
            "provider": engine.embedder.session.get_providers()[0],
            "cpu": platform.processor() or platform.machine(),
            "default_threads": default_threads(),
            "queries": len(texts),
            "mean_tokens": round(statistics.fmean(tokens), 1),
            "agents": len(AGENTS),
            "runs": runs,
            "target": {
                "p50_ms_batch1_1thread": TARGET_P50_MS,
                "met": bool(one_core and one_core["p50_ms"] < TARGET_P50_MS),
            },
        }
    )
    return 0


def _batch1(engine: ClassifierEngine, texts: list[str]) -> dict[str, Any]:
    """Sequential single-query calls."""
    laps = []
    started, cpu = time.perf_counter(), time.process_time()
    for text in texts:
        t0 = time.perf_counter()
        engine.classify(text, AGENTS)
        laps.append(time.perf_counter() - t0)
    return _summary(
        laps, len(texts), time.perf_counter() - started, time.process_time() - cpu, per=1
    )


def _batch32(engine: ClassifierEngine, texts: list[str]) -> dict[str, Any]:
    """Consecutive batches of 32 queries."""
    laps = []
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), 32):
        t0 = time.perf_counter()
        engine.classify_batch(texts[i : i + 32], AGENTS)
        laps.append(time.perf_counter() - t0)
    return _summary(
        laps, len(texts), time.perf_counter() - started, time.process_time() - cpu, per=32
    )


def _summary(laps: list[float], n: int, total: float, cpu: float, *, per: int) -> dict[str, Any]:
    """Latency percentiles, throughput, and CPU time per query (robust to a busy machine)."""
    ms = np.array(laps) * 1000
    out = {"queries_per_s": round(n / total, 1), "cpu_ms_per_query": round(cpu * 1000 / n, 2)}

    def pct(q: float) -> float:
        return round(float(np.percentile(ms, q)), 2)

    if per == 1:
        return {**out, "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99)}
    return {
        **out,
        "p50_batch_ms": pct(50),
        "p90_batch_ms": pct(90),
        "p50_ms_per_query": round(pct(50) / per, 2),
    }
