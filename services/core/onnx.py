"""The one way services open an onnxruntime session: provider, threads and spinning chosen here.

CUDA is taken when onnxruntime-gpu offers it (or the provider asked for, when available);
threads default to the physical cores this process may use; thread pools spin only when asked,
because a spinning pool burns the cores it waits on, and an edge box shares them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnxruntime as ort
import psutil
import structlog

from services.core.errors import ConfigError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

log = structlog.get_logger(__name__)


class ModelError(ConfigError):
    """A model that cannot be loaded; the message names the file at fault."""


def default_threads() -> int:
    """Physical cores, bounded by the CPUs this process may use (affinity, cgroup quota)."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return max(1, min(cores, allowed, _cgroup_cpus() or cores))


def _cgroup_cpus() -> int | None:
    """CPUs granted by a cgroup v2 quota (docker --cpus), rounded up; None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else math.ceil(int(quota) / int(period))


def choose_provider(available: list[str], wanted: str | None = None) -> str:
    """CUDA when present (or `wanted` when given and available), else CPU."""
    if wanted is not None:
        if wanted not in available:
            raise ModelError(f"provider {wanted} not available (have {available})")
        return wanted
    return CUDA if CUDA in available else CPU


def open_session(
    path: Path,
    *,
    threads: int | None = None,
    provider: str | None = None,
    spinning: bool = False,
) -> ort.InferenceSession:
    """An InferenceSession on `path`; a file onnxruntime refuses is a ModelError."""
    if not path.is_file():
        raise ModelError(f"{path}: missing")
    chosen = choose_provider(ort.get_available_providers(), provider)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning:  # spin only inside a run (between its ops), never between runs or requests
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=[chosen])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: onnxruntime cannot load it ({first_line})") from exc
    if chosen != CUDA:
        log.info("cuda_unavailable", model=str(path), available=ort.get_available_providers())
    return session
