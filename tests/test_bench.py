"""`edgecollab bench worker` survives its llama.cpp reference: a crash is reported, not fatal.

No timing is asserted: only that the benchmark ends, exits 0 and says what happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.broker import ROOT
from tools.bench import llama_ref

SEGFAULT = "import os, signal, sys; print('about to crash', file=sys.stderr, flush=True); " + (
    "os.kill(os.getpid(), signal.SIGSEGV)"
)
# a few tokens on the tiny model: the plumbing, not the speed
QUICK = ["--tokens", "4", "--concurrency", "2", "--repeats", "1", "--threads", "1"]


def test_a_child_killed_by_sigsegv_is_recorded_not_raised():
    result = llama_ref.run_child([sys.executable, "-c", SEGFAULT], timeout=60)
    assert result["status"] == "crashed"
    assert result["signal"] == "SIGSEGV" and result["exit_code"] == -11
    assert "about to crash" in result["stderr_tail"]


def test_a_child_that_fails_or_prints_no_json_is_recorded():
    failed = llama_ref.run_child([sys.executable, "-c", "raise SystemExit(3)"], timeout=60)
    assert failed["status"] == "failed" and failed["exit_code"] == 3
    silent = llama_ref.run_child([sys.executable, "-c", "print('hello')"], timeout=60)
    assert silent["status"] == "failed" and silent["reason"] == "no JSON on stdout"
    ok = llama_ref.run_child(
        [sys.executable, "-c", "import sys, json; print(json.dumps({'n': len(sys.stdin.read())}))"],
        "abc",
        timeout=60,
    )
    assert ok == {"status": "ok", "n": 3}


def test_a_child_past_its_timeout_is_recorded():
    result = llama_ref.run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert result["status"] == "timeout" and result["timeout_s"] == 1


# A stand-in for llama-cpp-python, put first on the child's PYTHONPATH: like 0.3.36 on an AMX
# CPU it dies of SIGSEGV when the model keeps its extra (repacking) buffer types, or always.
FAKE_LLAMA_CPP = """
import os, signal, sys
import numpy as np
from llama_cpp import llama_cpp as low_level

__version__ = "0.0+fake"


class Llama:
    def __init__(self, model_path, n_ctx, **kwargs):
        self.model_params = low_level.llama_model_default_params()
        if self.model_params.use_extra_bufts or os.environ.get("FAKE_LLAMA_ALWAYS_CRASHES"):
            print("fake llama.cpp: repacking weights", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        self.scores = np.zeros((n_ctx, 8), np.float32)
        self.n_tokens = 0

    def tokenize(self, text, add_bos, special):
        return list(range(len(text.split())))

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        self.n_tokens += len(tokens)
"""
FAKE_LOW_LEVEL = """
class llama_model_params:
    use_extra_bufts = True


def llama_model_default_params():
    return llama_model_params()
"""


def bench_worker(model: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF, but not really")
    args = ["--model", str(model), "--gguf", str(gguf), *QUICK]
    return subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "bench", "worker", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=150,
    )


@pytest.fixture
def fake_llama_cpp(tmp_path: Path) -> str:
    package = tmp_path / "fake" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LLAMA_CPP)
    (package / "llama_cpp.py").write_text(FAKE_LOW_LEVEL)
    return str(package.parent)


@pytest.mark.timeout(180)
def test_bench_worker_prints_json_when_llama_cpp_segfaults(
    tiny_int4_model_dir: Path, tmp_path: Path, fake_llama_cpp: str
):
    run = bench_worker(
        tiny_int4_model_dir, tmp_path, PYTHONPATH=fake_llama_cpp, FAKE_LLAMA_ALWAYS_CRASHES="1"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["decode_tok_s"] > 0 and result["aggregate_tok_s"].keys() == {"2"}
    reference = result["llama_cpp"]
    assert reference["status"] == "crashed" and reference["signal"] == "SIGSEGV"
    assert reference["exit_code"] == -11 and reference["extra_bufts"] is False
    assert "repacking weights" in reference["stderr_tail"]
    assert "Segmentation fault" in reference["stderr_tail"]  # faulthandler's Python stack
    assert result["vs_llama_cpp"] == {"decode": None, "prefill": None}


@pytest.mark.timeout(180)
def test_bench_worker_loads_llama_cpp_without_extra_buffer_types(
    tiny_int4_model_dir: Path, tmp_path: Path, fake_llama_cpp: str
):
    """The fake crashes only with repacking on: the reference arm turns it off and runs."""
    run = bench_worker(tiny_int4_model_dir, tmp_path, PYTHONPATH=fake_llama_cpp)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    reference = result["llama_cpp"]
    assert reference["status"] == "ok", reference
    assert reference["extra_bufts"] is False and reference["llama_cpp_version"] == "0.0+fake"
    assert reference["prompt_tokens"] > 0 and reference["decode_tok_s"] > 0
    assert 0 < reference["peak_rss_mb"] < result["peak_rss_mb"]  # the child's own, not inherited
    assert result["vs_llama_cpp"]["decode"] is not None


@pytest.mark.timeout(180)
def test_bench_worker_exits_0_when_the_reference_cannot_run(tiny_int4_model_dir: Path, tmp_path):
    """The real llama_cpp on a GGUF that is not one: `failed` (`unavailable` if not installed)."""
    run = bench_worker(tiny_int4_model_dir, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["llama_cpp"]["status"] in ("failed", "crashed", "unavailable")
    assert result["vs_llama_cpp"] == {"decode": None, "prefill": None}


def test_bench_faults_answers_every_query_of_a_killed_worker():
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "bench", "faults", "--fault", "worker_kill",
         "--queries", "40", "--rate", "10", "--stream"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)["faults"]["worker_kill"]
    assert result["sent"] == 40 and result["never_answered"] == 0
    assert result["answered_edge"] + result["failed_with_error"] == 40
    assert result["time_to_detect_s"] is not None  # the Last Will was seen
    streams = result["streams"]  # every answer streamed: what a follower shows is the answer
    assert streams["shown_equals_answer"] == streams["answered"] == result["answered_edge"]
    assert streams["chunks_republished"] == 0
