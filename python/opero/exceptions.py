"""Alias of :mod:`opero.errors`, kept for code written for opero 2.x.

``from opero.exceptions import OperoError`` gives the very same classes as
``from opero.errors import OperoError``: this module re-exports every public
name of :mod:`opero.errors`, so the two never drift apart.
"""

from opero import errors as _errors
from opero.errors import *  # noqa: F403  (the alias is exactly errors' public names)

__all__ = list(_errors.__all__)
