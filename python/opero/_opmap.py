"""PLACEHOLDER: replaced by the @opmap implementation (issue 4)."""

from typing import Any


def opmap(**options: Any) -> Any:
    """Not built yet."""
    raise NotImplementedError("@opmap is not built yet")
