"""Every ```python block of ``docs/**/*.md`` and ``README.md`` runs, so no example can rot.

Each block runs on its own, in a fresh namespace pre-filled with the stubbed
external calls of ``tests/docs_stubs.py`` (a database, an HTTP API, a slow
computation), inside a temporary working directory. A block that mentions Redis
gets the shared ``redis-server`` of ``tests/conftest.py`` through
``OPERO_REDIS_URL``; a block that uses Dask starts its own ``LocalCluster``, as
the docs show. A block that calls the demo HTTP service at
``http://127.0.0.1:8000`` (``docs/http.md``, ``docs/migrating.md``) calls the
``http_server`` fixture's service instead: the address is replaced by its URL.
A block opts out only with a first line ``# docs: no-run — <reason>`` (shell or
pseudo code), and the reason is required.

The last test builds the site with ``mkdocs build --strict`` (skipped when
mkdocs is not installed; ``make install`` adds it through the ``dev`` dependency group).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import docs_stubs
import opero

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_NO_RUN = re.compile(r"^#\s*docs:\s*no-run\b(?P<rest>.*)$")
_DASHES = "\u2014\u2013-"  # em dash, en dash, hyphen
_REASON = re.compile(rf"^\s*[{_DASHES}]+\s*\S")
_REDIS = re.compile(r"redis", re.IGNORECASE)
_DASK = re.compile(r"\b(distributed|dask)\b")
DEMO_URL = "http://127.0.0.1:8000"
"""The demo HTTP service's address as the docs show it (``python tests/httpserver.py``)."""


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the first line of code
    language: str
    code: str

    @property
    def name(self) -> str:
        """``docs/page.md:LINE``, the test id."""
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """Return every fenced code block of ``path`` (indented ones dedented), in order.

    Raises:
        ValueError: A fence is never closed.

    """
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        language = match["info"].strip().split()[0].lower() if match["info"].strip() else ""
        closing = re.compile(rf"^{re.escape(indent)}{fence[0]}{{{len(fence)},}}[ \t]*$")
        start = i + 1
        j = start
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: the code fence is never closed")
        body = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line.lstrip()
            for line in lines[start:j]
        )
        blocks.append(Block(path, start + 1, language, textwrap.dedent(body) + "\n"))
        i = j + 1
    return blocks


def python_blocks() -> list[Block]:
    """Return every ```python (or ```py) block of the docs and the README."""
    return [
        block
        for path in DOC_FILES
        for block in extract_blocks(path)
        if block.language in ("python", "py", "python3")
    ]


BLOCKS = python_blocks()


def _no_run_reason(block: Block) -> str | None:
    """Return the opt-out reason of a block, ``None`` when it runs; fail on a marker without one."""
    first = block.code.lstrip("\n").splitlines()[0] if block.code.strip() else ""
    match = _NO_RUN.match(first.strip())
    if match is None:
        return None
    if not _REASON.match(match["rest"]):
        pytest.fail(f"{block.name}: '# docs: no-run' needs a reason: '# docs: no-run — why'")
    return match["rest"].strip(" " + _DASHES)


def _fresh_namespace() -> dict[str, object]:
    """Return a namespace like a script's, holding the stubbed external calls.

    ``__name__`` is ``"__main__"``, as in a script run with ``python``, so an
    example may use the ``if __name__ == "__main__":`` guard that process pools
    need, and its functions travel to worker processes by value (cloudpickle).
    """
    namespace: dict[str, object] = {"__name__": "__main__", "__builtins__": __builtins__}
    for name in docs_stubs.__all__:
        namespace[name] = getattr(docs_stubs, name)
    return namespace


def _isolate_registry() -> Callable[[], None]:
    """Empty opero's namespace registry; return a function that puts it back.

    Each block is its own program: it starts with no namespace registered for
    ``opero.clear_cache()`` (other tests may have left strict backends on Redis
    servers they stopped), and what it registers does not follow the next block
    (the failure-policy example decorates a strict backend on a dead Redis).
    """
    from opero.cache import _registry

    with _registry._lock:
        backends = {k: list(v) for k, v in _registry._backends.items()}
        strong = {k: list(v) for k, v in _registry._strong.items()}
        caches = {k: list(v) for k, v in _registry._caches.items()}
        _registry._backends.clear()
        _registry._strong.clear()
        _registry._caches.clear()

    def restore() -> None:
        with _registry._lock:
            _registry._backends.clear()
            _registry._backends.update(backends)
            _registry._strong.clear()
            _registry._strong.update(strong)
            _registry._caches.clear()
            _registry._caches.update({k: weakref.WeakSet(v) for k, v in caches.items()})

    return restore


def _forget_shared_redis_backends() -> None:
    """Drop opero's shared Redis backends, so ``OPERO_REDIS_URL`` is read again at first use."""
    from opero.cache import _registry

    for config in [c for c in _registry._shared if c and c[0] == "redis"]:
        del _registry._shared[config]


def _marks(block: Block) -> list[pytest.MarkDecorator]:
    """Return the suite's markers for a block: ``redis`` and ``dask`` when it uses them."""
    marks = []
    if _REDIS.search(block.code):
        marks.append(pytest.mark.redis)
    if _DASK.search(block.code):
        marks.append(pytest.mark.dask)
    return marks


@pytest.mark.parametrize("block", [pytest.param(b, id=b.name, marks=_marks(b)) for b in BLOCKS])
def test_docs_example_runs(
    block: Block,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The code block runs to the end without an error (its own asserts included)."""
    if _no_run_reason(block) is not None:
        pytest.skip(f"marked no-run: {_no_run_reason(block)}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPERO_CACHE_DIR", str(tmp_path / "opero-cache"))
    monkeypatch.delenv("OPERO_CACHE_SECRET", raising=False)
    if _REDIS.search(block.code):
        redis_url = request.getfixturevalue("redis_url")
        monkeypatch.setenv("OPERO_REDIS_URL", redis_url)
        _forget_shared_redis_backends()
    text = block.code
    if DEMO_URL in text:
        text = text.replace(DEMO_URL, request.getfixturevalue("http_server"))
    # Line numbers in tracebacks are the Markdown file's.
    source = "\n" * (block.line - 1) + text
    code = compile(source, str(block.path), "exec")
    restore_registry = _isolate_registry()
    try:
        exec(code, _fresh_namespace())
    finally:
        opero.set_testing(False)
        restore_registry()


def test_examples_were_found() -> None:
    """The extractor finds the examples: every docs page but the API pages has a runnable block."""
    pages = {b.path for b in BLOCKS}
    api = ROOT / "docs" / "api"
    missing = [
        str(p.relative_to(ROOT))
        for p in DOC_FILES
        if p not in pages and api not in p.parents and p.name != "index.md"
    ]
    assert not missing, f"pages without a ```python example: {missing}"
    assert len(BLOCKS) >= 40


def test_extractor_handles_indented_fences(tmp_path: Path) -> None:
    """A block indented under an admonition or a tab is found and dedented."""
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n!!! tip\n\n    ```python\n    x = 1\n    if x:\n        y = 2\n    ```\n\n"
        "```bash\nmake test\n```\n",
        encoding="utf-8",
    )
    blocks = extract_blocks(page)
    assert [(b.language, b.line, b.code) for b in blocks] == [
        ("python", 6, "x = 1\nif x:\n    y = 2\n"),
        ("bash", 12, "make test\n"),
    ]


def test_no_run_marker_needs_a_reason(tmp_path: Path) -> None:
    """A no-run marker without a reason fails; with one, the block is skipped."""
    good = Block(tmp_path / "a.md", 1, "python", "# docs: no-run — shell session\n$ ls\n")
    assert _no_run_reason(good) == "shell session"
    bad = Block(tmp_path / "a.md", 1, "python", "# docs: no-run\n$ ls\n")
    with pytest.raises(pytest.fail.Exception):
        _no_run_reason(bad)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` succeeds: no broken link, no stale API reference."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").exists()
    assert "opero.opero" in (tmp_path / "site" / "api" / "opero" / "index.html").read_text()
