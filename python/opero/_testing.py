"""The testing switch: make every retry wait instant in a user's test suite.

Code decorated with ``@opero(retries=5)`` sleeps between attempts (0.1 s, then
0.15 s, ... by default). In a test suite those waits only slow things down, so
turn them off once, in a ``conftest.py``::

    import opero

    @pytest.fixture(autouse=True)
    def _instant_retries():
        with opero.set_testing():
            yield

or for the whole session with a bare ``opero.set_testing(True)``. While the
switch is on, every retry delay (the backoff schedule and ``backoff_function``)
is zero, so no retry sleeps; the number of attempts, the callbacks and the
errors are unchanged. Rate-limit waits stay real: a test that checks a rate
limit still sees it.
"""

from __future__ import annotations

from types import TracebackType

__all__ = ["is_testing", "set_testing"]

_enabled = False


def is_testing() -> bool:
    """Return whether the testing switch is on (retry waits are zero)."""
    return _enabled


class _TestingSwitch:
    """Returned by :func:`set_testing`; restores the previous state on ``with`` exit."""

    __slots__ = ("_previous",)

    def __init__(self, previous: bool) -> None:
        self._previous = previous

    def __enter__(self) -> _TestingSwitch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _enabled
        _enabled = self._previous

    def __repr__(self) -> str:
        return f"set_testing(enabled={_enabled})"


def set_testing(enabled: bool = True) -> _TestingSwitch:
    """Turn the testing switch on or off: while on, every retry wait is zero.

    The switch takes effect at once, process-wide. Used as a context manager it
    restores the previous state on exit::

        with opero.set_testing():
            flaky()  # retries happen, without sleeping

    Args:
        enabled: ``True`` (default) makes retry waits zero; ``False`` restores
            the configured backoff.

    Returns:
        A context manager; entering it is optional, leaving it restores the
        state that was in force before the call.

    Raises:
        TypeError: ``enabled`` is not a ``bool``.

    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_testing(enabled=...) takes a bool, got {enabled!r}")
    previous = _enabled
    _enabled = enabled
    return _TestingSwitch(previous)
