"""The testing switch: instant retries, and optionally fewer attempts, no cache, no rate limit.

Code decorated with ``@opero(retries=5)`` sleeps between attempts (0.1 s, then
0.15 s, ... by default). In a test suite those waits only slow things down, so
turn them off once, in a ``conftest.py``::

    import opero

    @pytest.fixture(autouse=True)
    def _instant_retries():
        with opero.set_testing():
            yield

or for the whole session with a bare ``opero.set_testing(True)``. While the
switch is on, every retry delay (the backoff schedule, ``backoff_function`` and
a server's ``Retry-After``) is zero, so no retry sleeps; the number of attempts,
the callbacks and the errors are unchanged. Each of these is independent and
off unless asked for:

* ``attempts=n`` caps the calls of one round at ``n`` (``attempts=1``: no retry);
* ``cache=False`` bypasses every cache (no lookup, no store: the function runs);
* ``rate_limit=False`` skips rate-limit waits (no token is taken).

Rate-limit waits otherwise stay real: a test that checks a rate limit still sees it.

The state is a few module globals read by the engine on the failure path and by
the adapters; a change of ``cache`` or ``rate_limit`` notifies the registered
listeners (:func:`listen`), so the hot paths never read the switch.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from types import TracebackType

__all__ = ["is_testing", "set_testing"]

logger = logging.getLogger("opero")

#: Retry waits are zero.
_enabled = False
#: Cap on the calls of one round (``None``: the configured ``retries`` apply).
_attempts: int | None = None
#: Caches are used (``False``: every cache is bypassed).
_cache = True
#: Rate-limit tokens are taken (``False``: no token, no wait).
_rate_limit = True

#: The whole state, as sent to worker processes: ``(enabled, attempts, cache, rate_limit)``.
State = tuple[bool, "int | None", bool, bool]

_lock = threading.Lock()


#: Guards :data:`_entered` and the restores of ``with`` exits (reentrant: a listener
#: may itself use the switch).
_blocks_lock = threading.RLock()
#: The switches entered with ``with`` and not yet left, oldest first.
_entered: list[_TestingSwitch] = []


def _new_lock_in_child() -> None:
    """After ``fork()``: a parent thread may have held the lock; it is not in the child."""
    global _lock, _blocks_lock
    _lock = threading.Lock()
    _blocks_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)
#: Called with no argument after ``cache`` or ``rate_limit`` changed (weakly held).
_listeners: weakref.WeakSet[Callable[[], None]] = weakref.WeakSet()


def is_testing() -> bool:
    """Return whether the testing switch is on (retry waits are zero).

    Returns:
        ``True`` between ``set_testing(True)`` and ``set_testing(False)`` (or
        the end of its ``with`` block).

    """
    return _enabled


def state() -> State:
    """Return the whole switch (for a worker process: :func:`restore`)."""
    return (_enabled, _attempts, _cache, _rate_limit)


def restore(saved: State | bool) -> None:
    """Put back a state returned by :func:`state` (a bare bool: the 2.x switch alone)."""
    global _enabled, _attempts, _cache, _rate_limit
    if isinstance(saved, bool):
        saved = (saved, None, True, True)
    before = (_cache, _rate_limit)
    _enabled, _attempts, _cache, _rate_limit = saved
    if before != (_cache, _rate_limit):
        _notify()


def listen(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever ``cache`` or ``rate_limit`` flips.

    The listener is held weakly (its owner keeps it alive: a wrapper's
    ``__dict__`` or globals); it is called once at registration when the switch
    is already bypassing something. This is how a hot path learns of the switch
    without reading it on every call.
    """
    with _lock:
        _listeners.add(listener)
    if not (_cache and _rate_limit):
        listener()


def _notify() -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener()
        except Exception:
            logger.exception("opero: applying the testing switch to %r failed", listener)


class _TestingSwitch:
    """Returned by :func:`set_testing`; restores the previous state on ``with`` exit.

    Blocks left out of order (two threads or asyncio tasks, each in its own
    ``with set_testing()``) still end in the state before the first: a block
    left while a later one is open hands its saved state to that one instead of
    restoring it over the later block's state. Leaving a block twice is a no-op.
    """

    __slots__ = ("_done", "_previous")

    def __init__(self, previous: State) -> None:
        self._previous = previous
        self._done = False

    def __enter__(self) -> _TestingSwitch:
        with _blocks_lock:
            _entered.append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with _blocks_lock:
            if self._done:
                return
            self._done = True
            index = next((i for i in range(len(_entered) - 1, -1, -1) if _entered[i] is self), None)
            if index is not None:
                del _entered[index]
                if index < len(_entered):  # a later block is still open: it restores
                    _entered[index]._previous = self._previous
                    return
            restore(self._previous)

    def __call__(self, *_args: object, **_kwargs: object) -> None:
        """Refuse use as a decorator (the switch would flip at import, for the whole run)."""
        with _blocks_lock:
            if not self._done:
                self._done = True
                restore(self._previous)
        raise TypeError(
            "opero.set_testing() is not a decorator (it switched at import time, for every "
            "test; now undone): use `with opero.set_testing(...):` in the test or in a fixture"
        )

    def __repr__(self) -> str:
        return (
            f"set_testing(enabled={_enabled}, attempts={_attempts}, cache={_cache}, "
            f"rate_limit={_rate_limit})"
        )


def set_testing(
    enabled: bool = True,
    *,
    attempts: int | None = None,
    cache: bool = True,
    rate_limit: bool = True,
) -> _TestingSwitch:
    """Turn the testing switch on or off: while on, every retry wait is zero.

    The switch takes effect at once, process-wide, and reaches the worker
    processes of ``@opmap``. Used as a context manager it restores the previous
    state on exit (also when the block raises; blocks nest)::

        with opero.set_testing(attempts=1, cache=False):
            flaky()  # one call, no sleep, no cached result

    Args:
        enabled: ``True`` (default) makes retry waits zero; ``False`` turns
            every part of the switch off (the configured behaviour).
        attempts: Cap on the calls of one round: ``attempts=1`` makes no
            retry (every ``arg_fallback`` candidate is still tried once);
            ``None`` (default) keeps ``retries``.
        cache: ``False`` bypasses every cache: no lookup and no store, the
            function runs on every call.
        rate_limit: ``False`` skips rate limits: no token is taken, no wait.

    Returns:
        A context manager; entering it is optional, leaving it restores the
        state that was in force before the call.

    Raises:
        TypeError: ``enabled``, ``cache`` or ``rate_limit`` is not a ``bool``,
            or ``attempts`` is not ``None`` or an int >= 1.
        ValueError: ``attempts``, ``cache=False`` or ``rate_limit=False``
            given with ``enabled=False``.

    """
    for name, value in (("enabled", enabled), ("cache", cache), ("rate_limit", rate_limit)):
        if not isinstance(value, bool):
            raise TypeError(f"set_testing({name}=...) takes a bool, got {value!r}")
    if attempts is not None and (
        isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1
    ):
        raise TypeError(
            f"set_testing(attempts=...) takes None or an int >= 1 (total calls; 1 = no "
            f"retry), got {attempts!r}"
        )
    if not enabled and (attempts is not None or not cache or not rate_limit):
        raise ValueError(
            "set_testing(False, ...) turns the whole switch off; attempts, cache=False and "
            "rate_limit=False only apply with set_testing(True, ...)"
        )
    previous = state()
    restore((enabled, attempts, cache, rate_limit))
    return _TestingSwitch(previous)
