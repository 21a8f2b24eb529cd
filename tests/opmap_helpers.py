"""Module-level functions for the ``@opmap`` tests: worker processes import them by name."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from opero import opmap


def record(path: str, line: str) -> None:
    """Append one line to ``path`` (O_APPEND writes of one line do not interleave)."""
    with open(path, "a") as handle:
        handle.write(line + "\n")


def count_lines(path: str) -> int:
    """Return how many lines ``path`` holds (0 when it does not exist)."""
    try:
        with open(path) as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


@opmap(mode="process", workers=2, retries=0, progress=False)
def p_square(x: int) -> int:
    """Square in a worker process."""
    return x * x


@opmap(mode="process", workers=2, retries=0, progress=False)
def p_pid(_x: Any) -> int:
    """Return the worker's process id."""
    return os.getpid()


@opmap(mode="process", workers=2, retries=0, progress=False)
def p_fail_odd(x: int) -> int:
    """Fail on odd items with a ValueError."""
    if x % 2:
        raise ValueError(f"odd item {x}")
    return x


@opmap(mode="process", workers=2, retries=0, progress=False)
def p_die_on_13(x: int) -> int:
    """Kill the worker process on item 13, return the item otherwise."""
    if x == 13:
        os._exit(3)
    return x


@opmap(mode="process", workers=2, retries=0, progress=False)
def p_kill_on_5(x: int) -> int:
    """Kill the worker process with SIGKILL on item 5, return the item otherwise."""
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@opmap(mode="process", workers=2, retries=0, progress=False)
def p_unpicklable_on_4(x: int) -> Any:
    """Return a value that cannot be pickled (a lock) on item 4, the item otherwise."""
    if x == 4:
        return threading.Lock()
    return x


@opmap(mode="process", workers=2, retries=0, progress=False, cache=True)
def p_cached_logged(item: tuple[str, int]) -> int:
    """Log the call to the file named in the item, return the number doubled."""
    path, x = item
    record(path, str(x))
    return 2 * x


@opmap(
    mode="process",
    workers=2,
    retries=0,
    progress=False,
    rate_limit=0.001,
    rate_burst=5,
    rate_max_wait=0.0,
)
def p_rate_limited(x: int) -> int:
    """Rate limited to 5 tokens then one every 1000 s; waits beyond 0 s fail at once."""
    return x


@opmap(mode="process", workers=2, retries=2, progress=False, _sleep=lambda s: None)
def p_flaky(item: tuple[str, int]) -> int:
    """Fail the first call of each item (logged to the item's file), succeed on the retry."""
    path, x = item
    marker = f"{path}.{x}"
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise ConnectionError(f"first call of {x}")
    return x


def busy(seconds: float) -> None:
    """Spin the CPU for ``seconds`` (time.perf_counter)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def cpu_item(x: int) -> int:
    """Spin 5 ms of CPU, then return the item."""
    busy(0.005)
    return x


def logged_span(item: tuple[str, int]) -> int:
    """Log "start" and "stop" around 5 ms of CPU to the item's file; return the number."""
    path, x = item
    record(path, "start")
    busy(0.005)
    record(path, "stop")
    return x


def cpu_100us(x: int) -> int:
    """Spin 0.1 ms of CPU, then return the item."""
    busy(0.0001)
    return x


def trivial(x: int) -> int:
    """Return the item plus one (a trivial job)."""
    return x + 1


@opmap(mode="async_process", workers=2, retries=0, progress=False)
async def ap_double(x: int) -> int:
    """Double in an aiomultiprocess worker."""
    return 2 * x


@opmap(mode="async_process", workers=2, retries=0, progress=False)
async def ap_fail_odd(x: int) -> int:
    """Fail on odd items in an aiomultiprocess worker."""
    if x % 2:
        raise ValueError(f"odd item {x}")
    return x


@opmap(
    mode="async_process",
    workers=2,
    retries=0,
    progress=False,
    rate_limit=0.001,
    rate_burst=4,
    rate_max_wait=0.0,
)
async def ap_rate_limited(x: int) -> int:
    """Rate limited to 4 tokens then one every 1000 s, in aiomultiprocess workers."""
    return x


@opmap(mode="dask", retries=0, progress=False)
def d_square(x: int) -> int:
    """Square on a Dask worker."""
    return x * x


@opmap(mode="dask", retries=0, progress=False)
def d_fail_odd(x: int) -> int:
    """Fail on odd items on a Dask worker."""
    if x % 2:
        raise ValueError(f"odd item {x}")
    return x


@opmap(
    mode="dask",
    workers=2,
    retries=0,
    progress=False,
    rate_limit=0.001,
    rate_burst=5,
    rate_max_wait=0.0,
)
def d_rate_limited(x: int) -> int:
    """Rate limited to 5 tokens then one every 1000 s on Dask workers."""
    return x


def identity(x: Any) -> Any:
    """Return the item unchanged."""
    return x


@opmap(mode="process", workers=2, retries=0, progress=False, chunksize=2)
def p_identity(x: Any) -> Any:
    """Return the item unchanged, in a worker process (two items per job)."""
    return x


async def _aidentity(x: Any) -> Any:
    return x


cached_identity = {
    "thread": opmap(mode="thread", workers=2, retries=0, progress=False, cache=True)(identity),
    "process": opmap(mode="process", workers=2, retries=0, progress=False, cache=True)(identity),
    "async": opmap(mode="async", workers=2, retries=0, progress=False, cache=True)(_aidentity),
}
"""Cached identity maps by mode, for the unkeyable-item tests."""


def _refuse_to_unpickle() -> None:
    raise ValueError("this object cannot be unpickled")


class BadInWorker:
    """Pickles in the parent; unpickling it (in a worker) raises ValueError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_unpickle, ())


def _refuse_in_parent(value: int) -> int:
    import multiprocessing

    if multiprocessing.parent_process() is None:
        raise ValueError("this result cannot be unpickled in the parent")
    return value


class BadInParent:
    """A result that pickles in the worker but raises when the parent unpickles it."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_in_parent, (self.value,))


@opmap(mode="process", workers=2, retries=0, progress=False, chunksize=4)
def p_bad_result_on_5(x: int) -> Any:
    """Return x, except item 5 gives a result the parent cannot unpickle."""
    return BadInParent(x) if x == 5 else x


def scaled(x: int, scale: int = 1, offset: int = 0) -> int:
    """Return ``x * scale + offset`` (shared keyword arguments, any mode)."""
    return x * scale + offset


async def a_scaled(x: int, scale: int = 1, offset: int = 0) -> int:
    """Async twin of :func:`scaled`."""
    return x * scale + offset


def fail_on_3_and_7(x: int) -> int:
    """Fail items 3 and 7 with a ValueError naming them, return the item doubled otherwise."""
    if x in (3, 7):
        raise ValueError(f"bad item {x}")
    return 2 * x


def logged_scaled(item: tuple[str, int], scale: int = 1) -> int:
    """Log the call to the file named in the item, return the number times ``scale``."""
    path, x = item
    record(path, f"{x} {scale}")
    return x * scale
