"""Progress bars for ``@opmap``: tqdm when it is installed and wanted, else nothing.

``progress=True`` shows a tqdm bar on stderr when tqdm is installed (the
``opero[progress]`` extra) and stderr is a terminal; ``progress="force"`` shows
it whenever tqdm is installed (notebooks, logs); ``progress=False`` never does.
A missing tqdm is never an error: the bar is simply off. The bar counts items,
cache hits included; its postfix shows the failures (``failed=3``) as they
happen, refreshed at most :data:`POSTFIX_EVERY` seconds apart, and when the
map ends a summary line is written below it (``tqdm.write``), only when the
bar was shown::

    opmap fetch: 1997 done, 3 failed, 120 cached in 12.4 s
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

__all__ = [
    "CURRENT_BAR",
    "POSTFIX_EVERY",
    "PROGRESS_VALUES",
    "WORKER_RETRIES",
    "Progress",
    "StoryBar",
    "counting_retries",
    "make_progress",
    "telling",
]

CURRENT_BAR: contextvars.ContextVar[StoryBar | None] = contextvars.ContextVar(
    "opero_opmap_bar", default=None
)
"""The shown bar of the map whose item runs in this thread or task (thread and async modes)."""

WORKER_RETRIES = [0]
"""Retries made in this worker process since its last job's results were sent (process mode)."""


def counting_retries(
    user: Callable[..., object] | None,
) -> Callable[[BaseException, int], None]:
    """Return an ``on_retry`` that counts each retry for the map's bar, then calls ``user``.

    The count goes to the bar of the item's map when it runs in this process
    (:data:`CURRENT_BAR`), else to :data:`WORKER_RETRIES`, which a process
    worker sends back with its job's results. Only maps whose ``progress`` is
    not ``False`` use it: the others keep the user's ``on_retry`` as it is.
    """
    from opero._pipeline.callbacks import adapt_callback  # import cycle

    adapted = adapt_callback("on_retry", user, (2, 1))

    def on_retry(exc: BaseException, attempt: int) -> None:
        bar = CURRENT_BAR.get()
        if bar is not None:
            bar.retry(1)
        else:
            WORKER_RETRIES[0] += 1
        if adapted is not None:
            adapted(exc, attempt)

    return on_retry


_log = logging.getLogger("opero")

POSTFIX_EVERY = 0.25
"""Seconds between two refreshes of the bar's postfix (failures come in bursts)."""

PROGRESS_VALUES: tuple[Any, ...] = (True, False, "force")
"""The accepted values of ``@opmap(progress=...)``."""


class Progress(Protocol):
    """What ``@opmap`` needs from a progress bar."""

    shown: bool
    """Whether a bar is on screen (``False``: every method is a no-op)."""

    def update(self, n: int = 1) -> Any:
        """Count ``n`` more finished items."""

    def close(self) -> Any:
        """Finish the bar."""

    def fail(self, n: int = 1) -> Any:
        """Count ``n`` more failed items (they are counted by :meth:`update` too)."""

    def cache(self, n: int = 1) -> Any:
        """Count ``n`` more items served from the cache (counted by :meth:`update` too)."""

    def retry(self, n: int = 1) -> Any:
        """Count ``n`` more retries (calls of an item after its first one)."""


class _NoProgress:
    """The progress bar that shows nothing (and costs nothing)."""

    shown = False

    def update(self, n: int = 1) -> None:
        """Ignore the update."""

    def fail(self, n: int = 1) -> None:
        """Ignore the failures."""

    def cache(self, n: int = 1) -> None:
        """Ignore the cache hits."""

    def retry(self, n: int = 1) -> None:
        """Ignore the retries."""

    def close(self) -> None:
        """Nothing to close."""


NO_PROGRESS = _NoProgress()


def _stderr_is_terminal() -> bool:
    """Return whether stderr is an interactive terminal."""
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def make_progress(progress: bool | Literal["force"], total: int | None, desc: str) -> Progress:
    """Return a bar for ``total`` items, or the silent one.

    Args:
        progress: ``True`` (tqdm on a terminal), ``"force"`` (tqdm whenever
            installed) or ``False`` (never).
        total: The number of items the bar counts to; ``None`` when unknown
            (a stream): the bar counts without a total.
        desc: The label, usually the function's name.

    Returns:
        A tqdm bar writing to stderr, or an object whose methods do nothing.

    """
    if progress is False or total == 0:
        return NO_PROGRESS
    if progress is True and not _stderr_is_terminal():
        return NO_PROGRESS
    try:
        tqdm = importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        return NO_PROGRESS
    return StoryBar(tqdm(total=total, desc=desc, unit="item", file=sys.stderr), desc)


class StoryBar:
    """A tqdm bar that also counts failures and cache hits, and sums the map up at the end.

    Args:
        bar: The tqdm bar.
        label: The map's name, used in the summary line.
        clock: The time source (seconds).

    """

    shown = True

    def __init__(self, bar: Any, label: str, clock: Any = time.monotonic) -> None:
        self.bar = bar
        self.label = label
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.failed = 0
        self.cached = 0
        self.retried = 0
        self._shown_at = -POSTFIX_EVERY
        self._shown = (0, 0)
        self._lock = threading.Lock()
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more finished items."""
        with self._lock:
            self.done += n
            self.bar.update(n)

    def fail(self, n: int = 1) -> None:
        """Count ``n`` failed items; refresh the postfix when it is due."""
        with self._lock:
            self.failed += n
            now = self.clock()
            if now - self._shown_at >= POSTFIX_EVERY:
                self._postfix(now)

    def retry(self, n: int = 1) -> None:
        """Count ``n`` retries; refresh the postfix when it is due."""
        with self._lock:
            self.retried += n
            now = self.clock()
            if now - self._shown_at >= POSTFIX_EVERY:
                self._postfix(now)

    def cache(self, n: int = 1) -> None:
        """Count ``n`` items served from the cache."""
        with self._lock:
            self.cached += n

    def _postfix(self, now: float) -> None:
        """Show the failure and retry counts in the postfix (lock held)."""
        self._shown_at = now
        self._shown = (self.failed, self.retried)
        try:
            self.bar.set_postfix_str(f"failed={self.failed} retried={self.retried}", refresh=True)
        except Exception:  # a closed stream: the item's outcome must not change
            _log.debug("opmap %s: could not refresh the progress bar", self.label, exc_info=True)

    def summary(self) -> str:
        """Return the summary line: finished (failed and cached included), failed, cached, time."""
        elapsed = self.clock() - self.started
        retried = f", {self.retried} retries" if self.retried else ""
        return (
            f"opmap {self.label}: {self.done} done, {self.failed} failed, {self.cached} cached"
            f"{retried} in {elapsed:.1f} s"
        )

    def close(self) -> None:
        """Show the last counts, close the bar and write the summary line below it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if (self.failed, self.retried) != self._shown:
                self._postfix(self.clock())
        self.bar.close()
        try:
            self.bar.write(self.summary(), file=self.bar.fp)
        except Exception:  # a closed stream
            _log.debug("opmap %s: could not write the summary", self.label, exc_info=True)


def telling(
    fn: Callable[[Any], Any], bar: Any, is_coroutine: bool, failures: bool = False
) -> Callable[[Any], Any]:
    """Return ``fn`` running with ``bar`` as :data:`CURRENT_BAR`, so its retries are counted.

    With ``failures``, each item that raises is also told to the bar as it fails.
    """
    if is_coroutine:

        async def atold(item: Any) -> Any:
            token = CURRENT_BAR.set(bar)
            try:
                return await fn(item)
            except Exception:
                if failures:
                    bar.fail(1)
                raise
            finally:
                CURRENT_BAR.reset(token)

        return atold

    def told(item: Any) -> Any:
        token = CURRENT_BAR.set(bar)
        try:
            return fn(item)
        except Exception:
            if failures:
                bar.fail(1)
            raise
        finally:
            CURRENT_BAR.reset(token)

    return told
