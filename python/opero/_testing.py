"""PLACEHOLDER: replaced by the testing switch (issue 3)."""


def set_testing(enabled: bool = True) -> None:
    """Not built yet."""
    raise NotImplementedError("set_testing is not built yet")
