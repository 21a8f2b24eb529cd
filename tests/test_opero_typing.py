"""Static typing of @opero: mypy keeps the decorated function's parameters and result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mypy_accepts_typing_check_and_flags_misuse() -> None:
    """Strict mypy passes on tests/typing_check.py, whose one misuse needs its type: ignore."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--warn-unused-ignores",
            "--no-incremental",
            "--cache-dir=/dev/null",
            str(ROOT / "tests" / "typing_check.py"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_rejects_wrong_argument_type(tmp_path: Path) -> None:
    """Without the ignore, calling a decorated function with a wrong type is a mypy error."""
    source = (ROOT / "tests" / "typing_check.py").read_text()
    bad = tmp_path / "typing_bad.py"
    bad.write_text(source.replace("  # type: ignore[arg-type]", ""))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir=/dev/null",
            str(bad),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=280,
        check=False,
    )
    assert result.returncode == 1
    assert "arg-type" in result.stdout
    assert 'expected "int"' in result.stdout


_IGNORES = "  # type: ignore[list-item]  # pyright: ignore[reportArgumentType]"
"""The expected-error comments of the misuse line in typing_check_opmap.py."""


def _run_mypy(path: Path) -> subprocess.CompletedProcess[str]:
    """Run strict mypy on one file (no cache) and return the finished process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--warn-unused-ignores",
            "--no-incremental",
            "--cache-dir=/dev/null",
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=280,
        check=False,
    )


def _basedpyright() -> str:
    """Return the basedpyright executable beside this Python, or skip with the reason."""
    exe = Path(sys.executable).with_name("basedpyright")
    if not exe.exists():
        pytest.skip("basedpyright is not installed (pip install basedpyright: the test group)")
    return str(exe)


def _run_pyright(path: Path) -> subprocess.CompletedProcess[str]:
    """Run basedpyright on one file, errors only, with this interpreter's packages."""
    return subprocess.run(
        [_basedpyright(), "--level", "error", "--pythonpath", sys.executable, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=280,
        check=False,
    )


@pytest.mark.slow
def test_mypy_types_opmap_items_and_results() -> None:
    """Strict mypy accepts typing_check_opmap.py: MappedFunction[T, R], list[R | Exception]."""
    result = _run_mypy(ROOT / "tests" / "typing_check_opmap.py")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_rejects_wrong_opmap_item_type(tmp_path: Path) -> None:
    """Without the ignore, mapping strings over a function of ints is a mypy error."""
    source = (ROOT / "tests" / "typing_check_opmap.py").read_text()
    bad = tmp_path / "opmap_bad.py"
    bad.write_text(source.replace(_IGNORES, ""))
    result = _run_mypy(bad)
    assert result.returncode == 1
    assert "list-item" in result.stdout
    assert '"int"' in result.stdout


@pytest.mark.slow
def test_pyright_types_opmap_items_and_results() -> None:
    """The pyright checker (basedpyright) accepts the opmap fixture, assert_type included."""
    result = _run_pyright(ROOT / "tests" / "typing_check_opmap.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 errors" in result.stdout


@pytest.mark.slow
def test_pyright_rejects_wrong_opmap_item_type(tmp_path: Path) -> None:
    """The pyright checker (basedpyright) reports a wrong item type once the ignore is gone."""
    source = (ROOT / "tests" / "typing_check_opmap.py").read_text()
    bad = tmp_path / "opmap_bad.py"
    bad.write_text(source.replace(_IGNORES, ""))
    result = _run_pyright(bad)
    assert result.returncode == 1
    assert "1 error" in result.stdout
    assert 'parameter "items" of type "Iterable[int]"' in result.stdout


_METHODS = ROOT / "tests" / "typing_check_methods.py"
"""The fixture of methods, classmethods and staticmethods over @opero."""

_IGNORES_ARG = "  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]"
"""The expected-error comments of the misuse lines in typing_check_methods.py."""


def _misuse_lines(source: str) -> list[int]:
    """Return the 1-based numbers of the lines carrying the expected-error comments."""
    return [n for n, line in enumerate(source.splitlines(), 1) if _IGNORES_ARG in line]


@pytest.mark.slow
def test_mypy_types_methods_classmethods_staticmethods() -> None:
    """Strict mypy accepts @opero under @classmethod/@staticmethod and on (async) methods."""
    result = _run_mypy(_METHODS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_pyright_types_methods_classmethods_staticmethods() -> None:
    """The pyright checker (basedpyright) accepts the methods fixture, assert_type included."""
    result = _run_pyright(_METHODS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 errors" in result.stdout


@pytest.mark.slow
def test_mypy_rejects_wrong_method_argument_types(tmp_path: Path) -> None:
    """Without the ignores, mypy reports a wrong argument type on every misuse line, only."""
    source = _METHODS.read_text()
    lines = _misuse_lines(source)
    assert len(lines) == 9
    bad = tmp_path / "methods_bad.py"
    bad.write_text(source.replace(_IGNORES_ARG, ""))
    result = _run_mypy(bad)
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in errors] == lines, result.stdout
    assert all(line.endswith("[arg-type]") for line in errors), result.stdout


@pytest.mark.slow
def test_pyright_rejects_wrong_method_argument_types(tmp_path: Path) -> None:
    """Without the ignores, basedpyright reports a wrong argument type on every misuse line."""
    source = _METHODS.read_text()
    lines = _misuse_lines(source)
    bad = tmp_path / "methods_bad.py"
    bad.write_text(source.replace(_IGNORES_ARG, ""))
    result = _run_pyright(bad)
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if " - error: " in line]
    assert [int(line.split(":")[1]) for line in errors] == lines, result.stdout
    assert all("cannot be assigned to parameter" in line for line in errors), result.stdout
