"""The identity of a decorated function in a shared cache (Redis, disk).

Entries of a shared cache are keyed ``{namespace}:{identity}:{digest of the
arguments}``, and every process and host that computes the same identity
shares them. The rule:

* a function defined at module level (its ``__qualname__`` has neither
  ``<locals>`` nor ``<lambda>``) is ``module.qualname``: stable across
  deploys, so a new release still reads what the old one stored;
* a local function or a lambda is ``module.qualname#<digest>``, where the
  digest covers its code (bytecode, constants, names, nested code), its
  default values and the values of its closure cells *at decoration time*.
  ``make_scaler(2)`` and ``make_scaler(3)`` then differ, and so do two
  lambdas of one scope; the same code with the same values, in any process,
  gives the same identity. Changing the code (or the Python version, whose
  bytecode differs) starts new entries.

Closure values are encoded like cache keys: ``None``, ``bool``, ``int``,
``float``, ``str``, ``bytes`` and tuples and frozensets of them; a function,
class or module by its name (a local function by its own identity); an enum
member by its class and name; an empty cell (a function that refers to itself)
as empty. A mutable container (``list``, ``dict``, ``set``, ``bytearray``) is
no identity, since what it holds at decoration may change later (two closures
over tables that are both empty when decorated must not share entries). Such a
value, or any other (a client, a lock, an instance), cannot be encoded stably,
so no other process could tell the function apart from its namesakes: unless
the function has a ``cache_key=`` (whose result must then tell such closures
apart), the decoration gets a *private* identity, ``module.qualname#p<process
nonce>-<n>``, unique to this decoration in this process (and its forked
children). Its entries are never shared with another decoration, another
process or a later run, and a warning on the ``opero`` logger says so once per
qualname and points to ``cache_key=``.

A bound method (``opero(...)(client.fetch)``) is the same function for every
object, so its identity also covers the object it is bound to, encoded the same
way: a class (a ``classmethod``) or a module by name, a plain value by content;
an instance of your own class gets a private identity unless ``cache_key=`` is
given. A built-in method bound to a value (``"abc".upper``) likewise. A
``functools.partial`` is identified by the function it wraps and its bound
arguments; a callable object (an instance with ``__call__`` and no
``__qualname__`` of its own) by its content, so in practice privately. None of
them is ever named by its ``repr``, which may hold a memory address that a
later object reuses.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import os
import threading
import types
from typing import Any

from opero._opero_core import stable_digest
from opero.errors import ConfigurationError

__all__ = ["function_identity", "is_local", "is_private"]

_PRIMITIVES = (type(None), bool, int, float, str, bytes)
_BUDGET = 10_000  # nodes encoded per function: a closure over a huge value asks for cache_key=
_TOP = "its code"  # where the encoding starts (named in error messages)
_DIGEST_CHARS = 16  # 64 bits of SHA-256: identities of one module.qualname never meet by chance
# Private identities: a random nonce per process (kept by forked children, which hold
# copies of the same objects) and a counter per decoration, so they never repeat, not
# even when a dropped closure's objects are freed and their ids reused.
_PROCESS_NONCE = os.urandom(6).hex()
_PRIVATE_SEQUENCE = itertools.count(1)
_WARNED: set[str] = set()  # qualnames already warned about (bounded by the program's code)
_WARNED_LOCK = threading.Lock()

logger = logging.getLogger("opero")


class _Unencodable(Exception):
    """A closure or default value has no stable encoding."""

    def __init__(self, where: str, value: Any) -> None:
        super().__init__(where)
        self.where = where
        self.value = value


def is_local(func: Any) -> bool:
    """Return whether ``func`` is a local function or a lambda (its name is not unique)."""
    qualname = getattr(func, "__qualname__", "") or ""
    return "<locals>" in qualname or "<lambda>" in qualname


def _name(obj: Any) -> tuple[str, str]:
    return (str(getattr(obj, "__module__", None) or "?"), str(getattr(obj, "__qualname__", "?")))


def _opero_internals(value: Any) -> Any:
    """Return the ``__opero__`` of a decorated function, read from its own ``__dict__``.

    Read there, not through ``getattr``: a mock or proxy answers any attribute.
    """
    try:
        return vars(value).get("__opero__")
    except TypeError:  # no __dict__
        return None


class _Encoder:
    """Turns values into what :func:`stable_digest` takes; tuples are tagged by their head."""

    def __init__(self, lenient: bool) -> None:
        self.lenient = lenient  # cache_key= given: unencodable values become their type
        self.budget = _BUDGET
        self.active: set[int] = set()  # functions being encoded (cycles)

    def keywords(self, mapping: dict[str, Any] | None, where: str) -> Any:
        """Encode a function's own name -> value mapping (keyword defaults, bound keywords)."""
        if mapping is None:
            return None
        return ("kw", *(("t", name, self.value(v, where)) for name, v in sorted(mapping.items())))

    def value(self, value: Any, where: str) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise _Unencodable(where, value)
        kind = type(value)
        if kind in _PRIMITIVES:
            return value
        if kind is tuple:
            return ("t", *(self.value(item, where) for item in value))
        if kind is frozenset:
            return ("s", frozenset(self.value(item, where) for item in value))
        if kind in _MUTABLE:
            # A list, dict, set or bytearray is no identity: what it holds at decoration
            # may change, so two closures over containers equal then (two empty tables
            # filled later) would read each other's entries.
            if self.lenient:
                return ("?", *_name(kind))
            raise _Unencodable(where, value)
        internals = _opero_internals(value)
        if internals is not None:  # an @opero function (any wrapper kind): what it decorates
            return ("o", self.value(internals.function, where))
        if isinstance(value, enum.Enum):
            return ("e", *_name(kind), value.name)
        if isinstance(value, types.FunctionType):
            return self.function(value, where)
        if isinstance(value, type):
            return ("c", *_name(value))
        if isinstance(value, types.ModuleType):
            return ("m", value.__name__)
        if isinstance(value, types.BuiltinFunctionType):
            return ("b", *_name(value))
        if kind is complex:
            return ("j", value.real, value.imag)
        if value is Ellipsis:
            return ("...",)
        if self.lenient:
            return ("?", *_name(kind))
        raise _Unencodable(where, value)

    def code(self, code: types.CodeType, where: str) -> Any:
        consts = []
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                consts.append(self.code(const, where))
            else:
                consts.append(self.value(const, where))
        return (
            "k",
            code.co_code,
            code.co_argcount,
            code.co_posonlyargcount,
            code.co_kwonlyargcount,
            code.co_flags,
            ("t", *code.co_names),
            ("t", *code.co_varnames),
            ("t", *code.co_freevars),
            ("t", *code.co_cellvars),
            consts,
        )

    def function(self, func: types.FunctionType, where: str) -> Any:
        module, qualname = _name(func)
        if not is_local(func):
            return ("f", module, qualname)
        if id(func) in self.active:  # recursion through closures
            return ("r", module, qualname)
        self.active.add(id(func))
        try:
            cells = []
            for name, cell in zip(func.__code__.co_freevars, func.__closure__ or (), strict=False):
                try:
                    content = cell.cell_contents
                except ValueError:  # not assigned yet: the function itself, decorated later
                    cells.append(("t", name, ("empty",)))
                    continue
                inner = f"closure variable {name!r}"
                if where != _TOP:  # a function inside the closure: say how it is reached
                    inner = f"{where}, through {func.__qualname__}'s {inner}"
                cells.append(("t", name, self.value(content, inner)))
            defaults = self.value(func.__defaults__, "a default value")
            kwdefaults = self.keywords(func.__kwdefaults__, "a keyword-only default value")
            code = self.code(func.__code__, where)
            return ("l", module, qualname, code, defaults, kwdefaults, cells)
        finally:
            self.active.discard(id(func))


def function_identity(func: Any, qualname: str, *, has_cache_key: bool) -> str:
    """Return the identity of ``func`` in a shared cache (see the module docstring).

    Args:
        func: The decorated function.
        qualname: Its ``module.qualname``.
        has_cache_key: A ``cache_key=`` was given: values that cannot be
            encoded count by their type instead of raising.

    Raises:
        ConfigurationError: What identifies the function cannot be encoded at
            all (a value that contains itself, a ``__hash__`` or ``__eq__`` that
            fails while it is walked). A value that merely has no stable
            encoding gives a private identity instead (see the module docstring).

    """
    while (internals := _opero_internals(func)) is not None:
        func = internals.function  # @opero over @opero: the identity of what is decorated
    bound = isinstance(func, types.MethodType)
    wrapper = _wrapper_kind(func)
    if (
        not bound
        and wrapper is None
        and (not is_local(func) or not isinstance(func, types.FunctionType))
    ):
        return qualname
    encoder = _Encoder(lenient=has_cache_key)
    what = _what_it_is(bound, wrapper)
    try:
        encoded = _encode(func, encoder, bound, wrapper)
        digest = stable_digest(encoded)
    except _Unencodable as exc:
        return _private_identity(qualname, what, exc)
    except (TypeError, ValueError, RuntimeError) as exc:  # RecursionError: a cycle
        raise ConfigurationError(
            f"{qualname} is {what}, but what identifies it has no stable encoding ({exc}); "
            "pass cache_key= (and a cache_namespace= of its own), or define the function "
            "at module level"
        ) from None
    return f"{qualname}#{digest[:_DIGEST_CHARS]}"


def _what_it_is(bound: bool, wrapper: str | None) -> str:
    """Say what ``func`` is and why a shared cache needs more than its name (for errors)."""
    if bound or wrapper == "builtin":
        return (
            "a bound method, so a shared cache (Redis, disk) tells it apart from the same "
            "method of other objects by the object it is bound to"
        )
    elif wrapper is not None:
        return (
            f"a {wrapper}, so a shared cache (Redis, disk) tells it apart from others of "
            "its kind by what it wraps and holds"
        )
    else:
        return (
            "a local function or lambda, so a shared cache (Redis, disk) tells it apart "
            "from others of the same name by its code and closure"
        )


def _encode(func: Any, encoder: _Encoder, bound: bool, wrapper: str | None) -> Any:
    """Encode what identifies ``func`` beyond its name (raises what ``encoder`` raises)."""
    if bound:
        return (
            "bound",
            encoder.value(func.__self__, "the object it is bound to"),
            encoder.value(func.__func__, _TOP),
        )
    elif wrapper == "functools.partial":
        return (
            "partial",
            encoder.value(func.func, "the function it wraps"),
            encoder.value(func.args, "its bound arguments"),
            encoder.keywords(func.keywords, "its bound arguments"),
        )
    elif wrapper == "builtin":
        owner = func.__self__
        where = "the object it is bound to"
        if type(owner) in _MUTABLE:  # {}.get: its content at decoration is no identity
            if not encoder.lenient:
                raise _Unencodable(where, owner)
            bound_to: Any = ("?", *_name(type(owner)))
        else:
            bound_to = encoder.value(owner, where)
        return ("builtin", bound_to, ("b", *_name(func)))
    elif wrapper is not None:  # a callable object: its class, and its content
        return ("object", encoder.value(func, "the callable object itself"))
    else:
        return encoder.function(func, _TOP)


_MUTABLE = (list, dict, set, bytearray)  # a built-in method bound to one: private


def _wrapper_kind(func: Any) -> str | None:
    """Name the kind of a callable whose name does not identify it; ``None`` for the rest.

    That is a ``functools.partial``, a built-in method bound to an object
    (``"abc".upper``), or a callable object that has no ``__qualname__`` of its
    own (an instance of a class with ``__call__``): their name is the same for
    every instance, or (``repr``) holds a memory address another object may reuse.
    """
    if isinstance(func, functools.partial):
        return "functools.partial"
    if isinstance(func, types.BuiltinMethodType):
        owner = getattr(func, "__self__", None)
        return None if owner is None or isinstance(owner, types.ModuleType) else "builtin"
    if isinstance(func, types.FunctionType | types.MethodType | type):
        return None
    name = getattr(func, "__qualname__", None)
    return None if isinstance(name, str) else "callable object"


def _private_identity(qualname: str, what: str, exc: _Unencodable) -> str:
    """Return an identity unique to this decoration, and warn once per qualname."""
    with _WARNED_LOCK:
        first = qualname not in _WARNED
        _WARNED.add(qualname)
    if first:
        logger.warning(
            "%s is %s; but %s holds a %s (or a value too large) that has no stable "
            "encoding, so this decoration's shared-cache entries are private to it and to "
            "this process (never shared with other processes or later runs). To share them, "
            "pass cache_key= (a function of (func, *args, **kwargs) returning a key that "
            "tells these functions apart), ideally with a cache_namespace= of their own, "
            "or define the function at module level",
            qualname,
            what,
            exc.where,
            type(exc.value).__qualname__,
        )
    return f"{qualname}#p{_PROCESS_NONCE}-{next(_PRIVATE_SEQUENCE)}"


def is_private(identity: str) -> bool:
    """Return whether ``identity`` is a private one (unique to one decoration in this process)."""
    return f"#p{_PROCESS_NONCE}-" in identity
