"""Package metadata: the version users upgrade to, and extras that hold only opero's features."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import opero

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# The libraries opero replaces: the benchmark's anchors, never part of `all`.
ANCHORS = {
    "cachetools",
    "cachebox",
    "moka-py",
    "tenacity",
    "backoff",
    "pyrate-limiter",
    "aiolimiter",
}
DEV_TOOLS = {
    "pytest",
    "pytest-timeout",
    "hypothesis",
    "mypy",
    "ruff",
    "mkdocs-material",
    "pre-commit",
}


def _names(requirements: list[str]) -> set[str]:
    """Return the distribution names of PEP 508 requirement strings, lower-cased."""
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}


def _release(version: str) -> tuple[int, ...]:
    """Return the numeric release part of a version string, ``"3.0.0"`` -> ``(3, 0, 0)``."""
    match = re.match(r"\d+(\.\d+)*", version)
    assert match is not None, version
    return tuple(int(part) for part in match.group(0).split("."))


def test_version_is_the_installed_distributions_and_sorts_above_2x() -> None:
    """``opero.__version__`` is the installed distribution's, 3.0.0 or later (above 2.7.5)."""
    assert opero.__version__ == metadata.version("opero")
    assert _release(opero.__version__) >= (3, 0, 0)
    assert _release(opero.__version__) > _release("2.7.5")


def test_cargo_version_is_the_package_version() -> None:
    """The version in Cargo.toml, the single source, is what the built package reports."""
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))
    assert cargo["package"]["version"] == opero.__version__


def test_all_extra_is_every_feature_extra_and_no_anchor() -> None:
    """``opero[all]`` is the union of the feature extras, without benchmark anchors or dev tools."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    features = set(extras) - {"all", "bench"}
    union = set().union(*(_names(extras[name]) for name in features))
    assert _names(extras["all"]) == union
    assert not _names(extras["all"]) & (ANCHORS | DEV_TOOLS)
    assert _names(extras["bench"]) == ANCHORS


def test_dev_tools_are_dependency_groups_not_extras() -> None:
    """Test, lint and docs tools live in ``[dependency-groups]``; no extra installs them."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not {"test", "docs", "dev", "lint"} & set(extras)
    for name, requirements in extras.items():
        assert not _names(requirements) & DEV_TOOLS, name
    groups = PYPROJECT["dependency-groups"]
    assert {"dev", "test", "lint", "docs"} <= set(groups)
    dev_includes = {item["include-group"] for item in groups["dev"] if isinstance(item, dict)}
    assert dev_includes == {"test", "lint", "docs"}


def test_classifiers_list_each_supported_python() -> None:
    """The classifiers name Python 3.11, 3.12 and 3.13, matching ``requires-python``."""
    classifiers = PYPROJECT["project"]["classifiers"]
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
