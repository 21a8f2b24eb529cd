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
