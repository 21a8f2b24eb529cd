"""Argument fallbacks of ``@opero``: the ``values[i:]`` candidates of ``arg_fallback``.

``arg_fallback="endpoint"`` names a parameter whose value (passed by the caller,
or else the signature's default) is a list or tuple of candidates. Candidate
``i`` calls the function with ``endpoint`` bound to ``values[i:]`` (same type),
so ``endpoint[0]`` is always the current candidate and the function can see the
ones left. A value that is not a list or tuple (for example ``None``) means one
call with that value, unchanged.

The parameter's position is found once, at decoration time; a call only binds
through :class:`inspect.Signature` in the rare case of a positional-only
parameter left to its default after other defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, overload

from opero.errors import ConfigurationError

__all__ = ["Fallback", "fallback_parameter"]

Call = tuple[tuple[Any, ...], dict[str, Any]]


class Fallback:
    """The precomputed binding of one ``arg_fallback`` parameter.

    Args:
        func: The decorated function.
        name: The parameter named by ``arg_fallback``.

    Raises:
        ConfigurationError: ``name`` is not a named parameter of ``func``.

    """

    __slots__ = ("default", "keyword_ok", "name", "position", "signature")

    def __init__(self, func: Callable[..., Any], name: str) -> None:
        param = fallback_parameter(func, name)
        self.signature = inspect.signature(func)
        self.name = name
        self.keyword_ok = param.kind is not inspect.Parameter.POSITIONAL_ONLY
        self.position: int | None = None
        if param.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            self.position = list(self.signature.parameters).index(name)
        self.default = param.default

    def candidates(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Sequence[Call]:
        """Return the calls to try in order: ``(args, kwargs)`` for each candidate.

        The first call is the caller's own arguments (or the default filled
        in); candidate ``i`` rebinds the parameter to ``values[i:]``. The
        values are copied once, before the first call (the function may change
        the list it receives); each later call is built when it is tried, so a
        long list costs one copy, not one slice per candidate up front.
        """
        name = self.name
        position = self.position
        if name in kwargs:
            values = kwargs[name]
        elif position is not None and len(args) > position:
            values = args[position]
        elif self.default is not inspect.Parameter.empty:
            values = self.default
        else:
            # A required argument is missing: one call, the function raises its TypeError.
            return [(args, kwargs)]
        if not isinstance(values, (list, tuple)) or len(values) <= 1:
            return [(args, kwargs)]
        return _Candidates(self, args, kwargs, values[:])

    def rebind(self, args: tuple[Any, ...], kwargs: dict[str, Any], rest: Any) -> Call:
        """Return the call with the parameter bound to ``rest`` (where the caller put it)."""
        name = self.name
        position = self.position
        if name in kwargs:
            return args, {**kwargs, name: rest}
        if position is not None and len(args) > position:
            return (*args[:position], rest, *args[position + 1 :]), kwargs
        return self._bind(args, kwargs, rest)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> Call:
        """Bind ``value`` to the parameter when the caller left it to its default."""
        if self.keyword_ok:
            return args, {**kwargs, self.name: value}
        if self.position == len(args):
            return (*args, value), kwargs
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments[self.name] = value
        return tuple(bound.args), dict(bound.kwargs)


def fallback_parameter(func: Callable[..., Any], name: str) -> inspect.Parameter:
    """Return the parameter ``name`` of ``func`` for ``arg_fallback``, or raise.

    Raises:
        ConfigurationError: ``name`` is not a named parameter of ``func``.

    """
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"@opero(arg_fallback={name!r}) needs the signature of {func!r}, which "
            "cannot be read; decorate a Python function."
        ) from exc
    param = sig.parameters.get(name)
    if param is None or param.kind in (
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ):
        names = [
            p.name
            for p in sig.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        qualname = getattr(func, "__qualname__", repr(func))
        raise ConfigurationError(
            f"@opero(arg_fallback={name!r}) is invalid: {qualname}{sig} has no "
            f"parameter named {name!r}; arg_fallback must name one of {names}."
        )
    return param


class _Candidates(Sequence[Call]):
    """The calls of one fallback chain, candidate ``i`` built when it is tried."""

    __slots__ = ("_args", "_fallback", "_kwargs", "_values")

    def __init__(
        self, fallback: Fallback, args: tuple[Any, ...], kwargs: dict[str, Any], values: Any
    ) -> None:
        self._fallback = fallback
        self._args = args
        self._kwargs = kwargs
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> Call: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Call]: ...

    def __getitem__(self, index: int | slice) -> Call | Sequence[Call]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        # Candidate 0 is values[0:], equal to what the call already binds.
        if index == 0:
            return self._args, self._kwargs
        return self._fallback.rebind(self._args, self._kwargs, self._values[index:])
