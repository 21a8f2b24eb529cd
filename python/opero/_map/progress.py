"""Progress bars for ``@opmap``: tqdm when it is installed and wanted, else nothing.

``progress=True`` shows a tqdm bar on stderr when tqdm is installed (the
``opero[progress]`` extra) and stderr is a terminal; ``progress="force"`` shows
it whenever tqdm is installed (notebooks, logs); ``progress=False`` never does.
A missing tqdm is never an error: the bar is simply off. The bar counts items,
cache hits included.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Literal, Protocol

__all__ = ["PROGRESS_VALUES", "Progress", "make_progress"]

PROGRESS_VALUES: tuple[Any, ...] = (True, False, "force")
"""The accepted values of ``@opmap(progress=...)``."""


class Progress(Protocol):
    """What ``@opmap`` needs from a progress bar."""

    def update(self, n: int = 1) -> Any:
        """Count ``n`` more finished items."""

    def close(self) -> Any:
        """Finish the bar."""


class _NoProgress:
    """The progress bar that shows nothing (and costs nothing)."""

    def update(self, n: int = 1) -> None:
        """Ignore the update."""

    def close(self) -> None:
        """Nothing to close."""


NO_PROGRESS = _NoProgress()


def _stderr_is_terminal() -> bool:
    """Return whether stderr is an interactive terminal."""
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def make_progress(
    progress: bool | Literal["force"], total: int | None, desc: str
) -> Progress | _NoProgress:
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
    bar: Progress = tqdm(total=total, desc=desc, unit="item", file=sys.stderr)
    return bar
