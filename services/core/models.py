"""Where model folders live: names resolve under EDGECOLLAB_MODELS_DIR (compose: /models)."""

from __future__ import annotations

import os
from pathlib import Path


def models_root() -> Path:
    return Path(os.environ.get("EDGECOLLAB_MODELS_DIR", "models"))


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A path as given when it exists or is absolute, else a name under the models root."""
    path = Path(name_or_path)
    if path.is_absolute() or path.exists():
        return path
    return models_root() / path
