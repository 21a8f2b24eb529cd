"""The package layout: lower layers never import upper ones, nor a private name of another file."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import opero

PACKAGE = Path(opero.__file__).resolve().parent

#: What each lower layer may import from opero (itself always). The limiter still reads
#: its stage's policy, wherever the pipeline keeps it.
ALLOWED: dict[str, tuple[str, ...]] = {
    "opero.errors": (),
    "opero._connections": ("opero.errors",),
    "opero.cache": ("opero._connections", "opero.errors", "opero._opero_core"),
    "opero._ratelimit": (
        "opero._connections",
        "opero.errors",
        "opero._opero_core",
        "opero._pipeline.policy",
        "opero._pipeline.checks",
        "opero._pipeline.options",
    ),
}

#: The packages whose files must not import a private name of another file.
NO_PRIVATE_IMPORTS = (
    "opero.errors",
    "opero._connections",
    "opero.cache",
    "opero._ratelimit",
    "opero._map",
)


def _module_name(path: Path) -> str:
    """Return the dotted name of a file of the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def _within(name: str, prefix: str) -> bool:
    """Return whether module ``name`` is ``prefix`` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Return every opero import of a file, lazy ones too: (module, names, line)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and _within(node.module, "opero"):
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], node.lineno) for a in node.names if _within(a.name, "opero"))
    return found


def _files(prefix: str) -> list[Path]:
    """Return the files of the package or module ``prefix``."""
    return sorted(
        p
        for p in PACKAGE.rglob("*.py")
        if "_bench" not in p.parts and _within(_module_name(p), prefix)
    )


def _targets(module: str, names: list[str]) -> list[str]:
    """Return what an import reaches: ``from opero import _map`` reaches ``opero._map``."""
    if not names:
        return [module]
    reached = []
    for name in names:
        full = f"{module}.{name}"
        reached.append(full if importlib.util.find_spec(module) and _is_module(full) else module)
    return reached


def _is_module(name: str) -> bool:
    """Return whether ``name`` is an importable module or package."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layer_imports_only_what_it_may(layer: str) -> None:
    """Errors, connections, cache and rate limit import only the layers below them."""
    files = _files(layer)
    assert files, layer
    allowed = (layer, *ALLOWED[layer])
    bad = [
        f"{_module_name(path)}:{line} imports {target}"
        for path in files
        for module, names, line in _imports(path)
        for target in _targets(module, names)
        if not any(_within(target, ok) for ok in allowed)
    ]
    assert bad == []


@pytest.mark.parametrize("package", NO_PRIVATE_IMPORTS)
def test_no_file_imports_a_private_name_of_another(package: str) -> None:
    """A name another file needs is public in its module (only private modules may be imported)."""
    bad = [
        f"{_module_name(path)}:{line} imports {module}.{name}"
        for path in _files(package)
        for module, names, line in _imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__") and not _is_module(f"{module}.{name}")
    ]
    assert bad == []


def test_rules_catch_a_violation(tmp_path: Path) -> None:
    """The import scan sees a lazy import of the pipeline inside a function, and a private name."""
    source = tmp_path / "leaky.py"
    source.write_text(
        "def f():\n"
        "    from opero._policy import Policy\n"
        "    from opero.cache._redis import _LOCK\n",
        encoding="utf-8",
    )
    found = _imports(source)
    assert found == [("opero._policy", ["Policy"], 2), ("opero.cache._redis", ["_LOCK"], 3)]
    assert _targets("opero._policy", ["Policy"]) == ["opero._policy"]
    assert _targets("opero", ["_map"]) == ["opero._map"]
    assert not _is_module("opero.cache._redis._LOCK")
