"""What a callback may be told about a call: :class:`CallDetails`.

A callback of ``@opero`` (``on_retry``, ``on_success``, ``on_failure``,
``on_fallback``, ``on_rate_limit_wait``, ``on_circuit_open``) may take one
:class:`CallDetails` argument instead of its classic arguments; the classic
arities keep working (see :mod:`opero._pipeline.callbacks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CallDetails"]


@dataclass(frozen=True, slots=True)
class CallDetails:
    """One moment of one decorated call, as a callback sees it.

    Attributes:
        function: The decorated function's ``module.qualname``.
        args: The positional arguments of the call.
        kwargs: The keyword arguments of the call.
        attempt: The 1-based number of the call to the function this event is
            about (``1`` for the first call; fallback candidates count).
        wait: The seconds about to be waited (before a retry, or for a
            rate-limit token); ``0.0`` when no wait follows.
        waited: The seconds this call has waited so far (backoff and
            rate-limit waits, not time spent in the function).
        exception: The error of the attempt, or ``None``.
        result: The attempt's result (``None`` when it failed).
        event: What happened: ``"retry"``, ``"success"``, ``"failure"``,
            ``"fallback"``, ``"rate_limit_wait"`` or ``"circuit_open"``.

    """

    function: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    wait: float = 0.0
    waited: float = 0.0
    exception: BaseException | None = None
    result: Any = None
    event: str = ""


def wants_details(func: Any) -> bool:
    """Return whether callback ``func`` takes one :class:`CallDetails` argument.

    The rule, applied once at decoration time: the callback has exactly one
    positional parameter (``*args`` and keyword-only parameters with defaults
    aside), and that parameter is annotated ``CallDetails`` (the class, or a
    string naming it, as ``from __future__ import annotations`` leaves it) or
    is named ``details``. Anything else keeps the classic arguments.
    """
    import inspect

    try:
        sig = inspect.signature(func)
    except Exception:  # unreadable (a builtin), or a __signature__ that raises
        return False
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) != 1:
        return False
    param = positional[0]
    annotation = param.annotation
    if annotation is CallDetails:
        return True
    if isinstance(annotation, str):
        text = annotation.strip().strip("'\"")
        if text == "CallDetails" or text.endswith(".CallDetails"):
            return True
    return param.name == "details"
