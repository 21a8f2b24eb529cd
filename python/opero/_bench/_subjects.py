"""What several benchmark groups time: trivial functions, ``@opero`` and an event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

__all__ = ["Decorator", "aok", "event_loop", "ok", "opero_decorator"]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def ok(x: int) -> int:
    """Return ``x + 1``: the cheapest function worth decorating."""
    return x + 1


async def aok(x: int) -> int:
    """Async :func:`ok`."""
    return x + 1


def event_loop(stack: contextlib.ExitStack) -> asyncio.AbstractEventLoop:
    """Return a new event loop that ``stack`` closes."""
    loop = asyncio.new_event_loop()
    stack.callback(loop.close)
    return loop


def opero_decorator(**options: Any) -> Decorator:
    """Return ``opero(**options)``, importing opero only when a group runs."""
    from opero import opero

    decorator: Decorator = opero(**options)
    return decorator
