"""Smoke test of an installed opero wheel, run from outside the source tree.

Imports opero, makes a cached call, a retried call and a process map, and
checks the version and that the native core came from the installed wheel.
Exits non-zero (an AssertionError) on any failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import opero
from opero import opero as opero_decorator
from opero import opmap

calls: list[int] = []


@opero_decorator(cache=True)
def square(x: int) -> int:
    """Return ``x * x``, recording the call."""
    calls.append(x)
    return x * x


attempts: list[int] = []


@opero_decorator(retries=3, min_delay=0.001, retry_on=ConnectionError)
def flaky() -> str:
    """Fail twice with ``ConnectionError``, then return ``"ok"``."""
    attempts.append(1)
    if len(attempts) < 3:
        raise ConnectionError("try again")
    return "ok"


@opmap(mode="process", workers=2)
def double(x: int) -> int:
    """Return ``2 * x`` (in a worker process)."""
    return 2 * x


if __name__ == "__main__":
    here = Path(opero.__file__).resolve()
    assert "site-packages" in here.parts, f"opero imported from the source tree: {here}"
    assert opero.__version__ == sys.argv[1], (opero.__version__, sys.argv[1])
    assert square(7) == 49
    assert square(7) == 49
    assert calls == [7], calls  # the second call was a cache hit
    assert flaky() == "ok"
    assert len(attempts) == 3, attempts
    assert double(list(range(100))) == [2 * x for x in range(100)]
    print(f"smoke OK: opero {opero.__version__} from {here.parent}")
