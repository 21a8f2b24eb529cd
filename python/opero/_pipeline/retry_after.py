"""Read the wait a server asked for from an exception (``retry_after=True``, the default).

Sources, first found wins:

1. a ``retry_after`` attribute: seconds (int or float) or a
   :class:`datetime.timedelta` (a ``str`` is read like the header);
2. the ``Retry-After`` header of ``exc.headers`` (``aiohttp.ClientResponseError``)
   or ``exc.response.headers`` (``httpx.HTTPStatusError``, ``requests.HTTPError``).

The header is delta-seconds or an HTTP-date (RFC 9110, section 10.2.3); a date is
compared with the wall clock (``time.time``). A past date or a negative number is
0; something unreadable is no demand (the backoff schedule applies) and a debug
record. None of those libraries is imported: the attributes are duck-typed.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import math
import numbers
import re
import time
from collections.abc import Callable
from typing import Any

from opero._pipeline.checks import MAX_SECONDS

__all__ = ["parse_retry_after", "server_wait"]

logger = logging.getLogger("opero")

#: A longer header value is no demand (no valid one is this long).
MAX_HEADER = 64
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def server_wait(exc: BaseException, now: Callable[[], float] = time.time) -> float | None:
    """Return the seconds ``exc`` asks to wait before a retry, or ``None`` for no demand.

    Never raises: a hostile attribute or an unreadable value is a debug record.
    The result is in ``[0, MAX_SECONDS]``.
    """
    try:
        value = getattr(exc, "retry_after", None)
        if value is not None:
            wait = _seconds(value, now)
            if wait is not None:
                return wait
        headers = getattr(exc, "headers", None)
        if headers is None:
            headers = getattr(getattr(exc, "response", None), "headers", None)
        if headers is None:
            return None
        header = _header(headers)
        return None if header is None else parse_retry_after(header, now)
    except Exception:
        logger.debug("opero: could not read a Retry-After from %s", type(exc), exc_info=True)
        return None


def _header(headers: Any) -> Any:
    """Return the ``Retry-After`` value of a headers mapping (any case), or ``None``."""
    get = getattr(headers, "get", None)
    if not callable(get):
        return None
    value = get("Retry-After")
    if value is None and isinstance(headers, dict):  # a plain dict is case-sensitive
        value = next(
            (v for k, v in headers.items() if isinstance(k, str) and k.lower() == "retry-after"),
            None,
        )
    return value


def _seconds(value: Any, now: Callable[[], float]) -> float | None:
    """Return a ``retry_after`` attribute as seconds (``None`` if it is not a wait)."""
    if isinstance(value, datetime.timedelta):
        return _clamp(value.total_seconds())
    if isinstance(value, (str, bytes)):
        return parse_retry_after(value, now)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return _clamp(float(value))
    except (OverflowError, ValueError, TypeError):
        return MAX_SECONDS if value > 0 else None  # type: ignore[operator]


def _clamp(seconds: float) -> float | None:
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_SECONDS)


def parse_retry_after(value: Any, now: Callable[[], float] = time.time) -> float | None:
    """Return a ``Retry-After`` header value as seconds, or ``None`` if unreadable.

    Args:
        value: ``"120"`` (delta-seconds; a fraction is accepted) or an HTTP-date
            such as ``"Wed, 21 Oct 2015 07:28:00 GMT"``; ``str`` or ``bytes``.
        now: The wall clock a date is compared with.

    Returns:
        Seconds in ``[0, MAX_SECONDS]`` (a past date is 0), or ``None``.

    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str) or len(value) > MAX_HEADER:
        logger.debug("opero: ignoring a Retry-After that is not a short str: %.80r", value)
        return None
    text = value.strip()
    if _SECONDS.fullmatch(text):
        return _clamp(float(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        logger.debug("opero: ignoring an unreadable Retry-After %r", text)
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return _clamp(when.timestamp() - now())
