"""The tree is the architecture: every import points down a layer, never up or sideways."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each layer and what it may import of ours besides itself ("x.*": x and all below it; "tools":
# the package root alone, for ROOT). Services never import one another.
SERVICES = (
    "classifier", "orchestrator", "sensor", "worker", "replicator", "gateway", "sandbox", "kb",
)  # fmt: skip
LAYERS: dict[str, tuple[str, ...]] = {
    "schemas": (),
    "services": (),
    "services.core": ("schemas",),
    "services.data": ("schemas", "services.core"),
    "services.scheduling": ("schemas", "services.core"),
    **{
        f"services.{name}": ("schemas", "services.core", "services.data", "services.scheduling")
        for name in SERVICES
    },
    "tools": (),
    "tools.common": ("schemas", "services.*", "tools"),
    "tools.export": ("schemas", "services.*", "tools", "tools.common"),
    "tools.sim": ("schemas", "services.*", "tools", "tools.common"),
    "tools.train": ("schemas", "services.*", "tools", "tools.common", "tools.export"),
    "tools.bench": (
        "schemas",
        "services.*",
        "tools",
        "tools.common",
        "tools.export",
        "tools.sim",
        "tools.train",
    ),
    "tools.cli": ("schemas", "services.*", "tools.*"),  # the top: it registers every command
}


def _layer(module: str) -> str:
    """The deepest layer holding `module` ("tools" is the root package alone)."""
    within = [n for n in LAYERS if module == n or (n != "tools" and module.startswith(n + "."))]
    return max(within, key=len) if within else module


def _allowed(target: str, allowed: tuple[str, ...]) -> bool:
    return any(
        target == a or (a.endswith(".*") and (target + ".").startswith(a[:-1])) for a in allowed
    )


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in ("schemas", "services", "tools")}


def _modules() -> list[tuple[str, Path]]:
    paths = [*ROOT.glob("schemas/**/*.py"), *ROOT.glob("services/**/*.py")]
    paths += [p for p in ROOT.glob("tools/**/*.py") if p.parent != ROOT / "tools"]
    return [(".".join(p.relative_to(ROOT).with_suffix("").parts), p) for p in sorted(paths)]


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_imports_point_down(module: str, path: Path) -> None:
    own = _layer(module)
    allowed = (own, *LAYERS[own])
    wrong = []
    for imported in _imports(path):
        target = _layer(imported)
        if target != own and not _allowed(target, allowed):
            wrong.append(imported)
    assert not wrong, f"{module} ({own}) imports {wrong}; it may import {allowed}"
