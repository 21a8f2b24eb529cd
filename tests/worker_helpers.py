"""Module-level functions for the worker tests: worker processes import them by name."""

from __future__ import annotations

import os
import threading
from typing import Any

STATE: dict[str, Any] = {}
"""What the initializer set up in this process (a model, a connection...)."""
LOCAL = threading.local()
"""What the initializer set up in this thread (thread mode)."""


def boom(x: int) -> int:
    """Fail item 2 with a ValueError, return the others."""
    if x == 2:
        raise ValueError("bad item", x)  # BOOM-LINE
    return x


async def aboom(x: int) -> int:
    """Fail item 2 with a ValueError, return the others (async)."""
    if x == 2:
        raise ValueError("bad async item", x)  # ABOOM-LINE
    return x


class Unpicklable(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")
        self.lock = threading.Lock()


def unpicklable_boom(x: int) -> int:
    """Fail item 1 with an exception that does not unpickle."""
    if x == 1:
        raise Unpicklable(x, x)  # UNPICKLABLE-LINE
    return x


def record(path: str, line: str) -> None:
    """Append one line to ``path`` (O_APPEND writes of one line do not interleave)."""
    with open(path, "a") as handle:
        handle.write(line + "\n")


def init_process(path: str, value: str) -> None:
    """Set up this worker process: note its pid in ``path`` and keep ``value``."""
    record(path, str(os.getpid()))
    STATE["value"] = value


def init_thread(path: str, value: str) -> None:
    """Set up this thread: note it in ``path`` and keep ``value`` in a thread-local."""
    record(path, str(threading.get_ident()))
    LOCAL.value = value


def init_fail(path: str) -> None:
    """Note the attempt in ``path``, then fail like a missing model file."""
    record(path, str(os.getpid()))
    raise FileNotFoundError("model.bin")


def with_state(x: int) -> tuple[int, int, Any]:
    """Return the item, this process's pid and what the initializer set up here."""
    return x, os.getpid(), STATE.get("value")


async def awith_state(x: int) -> tuple[int, int, Any]:
    """Async twin of :func:`with_state`."""
    return x, os.getpid(), STATE.get("value")


def with_thread_state(x: int) -> tuple[int, Any]:
    """Return the item and what the initializer set up in this thread."""
    return x, getattr(LOCAL, "value", None)


def logged_pid(arg: tuple[str, int]) -> tuple[int, int]:
    """Note the item in the file ``arg[0]``, return it with this process's pid."""
    path, x = arg
    record(path, str(x))
    return x, os.getpid()


def fail_thirds(x: int) -> int:
    """Fail every item divisible by 3 with a ValueError."""
    if x % 3 == 0:
        raise ValueError(f"item {x}")
    return x


def flaky_path(arg: tuple[str, int]) -> int:
    """Fail the first call of each item (noted in the folder ``arg[0]``), succeed the second."""
    folder, x = arg
    mark = os.path.join(folder, str(x))
    if not os.path.exists(mark):
        open(mark, "w").close()
        raise ConnectionError(f"first call of {x}")
    return x


async def aflaky_path(arg: tuple[str, int]) -> int:
    """Async twin of :func:`flaky_path`."""
    return flaky_path(arg)


def init_exit() -> None:
    """End the worker process from its initializer, as a crash in native code would."""
    os._exit(7)


def unpicklable_then_value_error(arg: tuple[str, int]) -> int:
    """Raise an unpicklable exception on an item's first call, a ValueError on later ones."""
    folder, x = arg
    mark = os.path.join(folder, str(x))
    if not os.path.exists(mark):
        open(mark, "w").close()
        raise Unpicklable(x, x)
    raise ValueError("second call", x)


def init_sleep(seconds: float) -> None:
    """Set up very slowly (a huge model on a slow disk)."""
    import time

    time.sleep(seconds)
