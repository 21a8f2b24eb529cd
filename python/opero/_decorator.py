"""PLACEHOLDER: replaced by the @opero implementation (issue 3)."""

from typing import Any


def opero(**options: Any) -> Any:
    """Not built yet."""
    raise NotImplementedError("@opero is not built yet")


def clear_cache(namespace: str | None = None) -> None:
    """Not built yet."""
    raise NotImplementedError("clear_cache is not built yet")
