"""User callbacks of ``@opero``: arity detected once, exceptions logged, never raised.

``on_retry(exc)`` or ``on_retry(exc, attempt)``, ``on_success(result)`` or
``on_success()``, ``on_failure(exc)`` and ``on_cache_hit()``. Each is adapted at
decoration time into a function of a fixed arity that calls the user's
callback with the arguments it accepts and logs (``logger.exception`` on the
``opero`` logger) anything it raises: a callback never changes the outcome of a
call nor the number of attempts.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["adapt_callback", "positional_arity"]

logger = logging.getLogger("opero")


def positional_arity(func: Callable[..., Any], most: int) -> int:
    """Return how many positional arguments (up to ``most``) ``func`` accepts.

    Required positional parameters count, and so do optional ones and
    ``*args``. When the signature cannot be read (some builtins), ``most`` is
    assumed.
    """
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return most
    count = 0
    for param in sig.parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return most
        if param.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            count += 1
    return min(count, most)


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def adapt_callback(
    option: str, func: Callable[..., Any] | None, arities: tuple[int, ...]
) -> Callable[..., None] | None:
    """Wrap a user callback so it is called with the arguments it accepts, safely.

    Args:
        option: The option name (``"on_retry"``...), used in log records.
        func: The user's callback, or ``None``.
        arities: The accepted positional arities, largest first; the adapted
            function always takes the largest.

    Returns:
        ``None`` when ``func`` is ``None``, else a function of
        ``max(arities)`` positional arguments that never raises an
        ``Exception``.

    """
    if func is None:
        return None
    full = arities[0]
    accepted = positional_arity(func, full)
    # Pick the largest arity the callback can take among the documented ones.
    use = next((a for a in arities if a <= accepted), arities[-1])
    return _ADAPTERS[full, use](func, option, _name(func))


# One factory per (arity called with, arity the callback takes): the adapted callbacks
# run on the hot path (on_success after every call), so each is a direct closure.


def _adapt_0_0(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call0() -> None:
        try:
            user()
        except Exception:
            logger.exception("opero: %s callback %s raised; ignored", option, label)

    return call0


def _adapt_1_1(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call1(a: Any) -> None:
        try:
            user(a)
        except Exception:
            logger.exception("opero: %s callback %s raised; ignored", option, label)

    return call1


def _adapt_1_0(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call1(a: Any) -> None:
        try:
            user()
        except Exception:
            logger.exception("opero: %s callback %s raised; ignored", option, label)

    return call1


def _adapt_2_2(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call2(a: Any, b: Any) -> None:
        try:
            user(a, b)
        except Exception:
            logger.exception("opero: %s callback %s raised; ignored", option, label)

    return call2


def _adapt_2_1(user: Callable[..., Any], option: str, label: str) -> Callable[..., None]:
    def call2(a: Any, b: Any) -> None:
        try:
            user(a)
        except Exception:
            logger.exception("opero: %s callback %s raised; ignored", option, label)

    return call2


_ADAPTERS: dict[tuple[int, int], Callable[[Callable[..., Any], str, str], Callable[..., None]]] = {
    (0, 0): _adapt_0_0,
    (1, 1): _adapt_1_1,
    (1, 0): _adapt_1_0,
    (2, 2): _adapt_2_2,
    (2, 1): _adapt_2_1,
}
