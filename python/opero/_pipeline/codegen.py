"""First-call wrappers generated with the decorated function's own parameters.

Forwarding ``*args, **kwargs`` costs about 80 ns per call on CPython 3.11
(packing a tuple and a dict, then unpacking them); a wrapper with the same
parameters as ``func`` forwards in about 17 ns. So for plain Python functions
without ``*args``/``**kwargs`` the wrapper of the first call is generated at
decoration time with ``func``'s own parameter list (defaults are the very same
objects), holding only what is configured: with ``retries=3`` alone, one
``try``/``except`` around the call. Other callables keep the drivers' generic
closures.

The source of every generated wrapper is registered in :mod:`linecache` under
a file name ``<opero wrapper of module.qualname (digest)>``, so tracebacks
formatted by :mod:`traceback` (logging, pytest, debuggers) show the lines of
the wrapper frame (before 3.13 the interpreter's printer of an uncaught
exception reads files from disk and shows none). The digest is of the source:
decorating the same function the same way again reuses the entry, so the
cache grows with distinct wrappers, not with decorations. An entry stays while
a wrapper compiled from it is alive, and the last :data:`KEEP_DEAD` entries
whose wrappers are gone stay too (a redecoration reuses them); older ones are
removed from :mod:`linecache`, so decorating ever new functions in a loop (code
generated per tenant, per request) does not grow it without bound.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import linecache
import os
import threading
import types
import unicodedata
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opero._pipeline import stats
from opero._ratelimit import MIN_WAIT

__all__ = ["KEEP_DEAD", "PREFIX", "Template", "specialize"]

#: Every name the template uses starts with this (a parameter may shadow any builtin).
PREFIX = "__opero_"
P = PREFIX

#: How many linecache entries without a live wrapper are kept (most recent first).
KEEP_DEAD = 256

_lock = threading.Lock()
#: How many live wrappers were compiled from each registered file name.
_live: dict[str, int] = {}
#: File names whose wrappers are all gone, oldest first.
_dead: collections.OrderedDict[str, None] = collections.OrderedDict()
#: File names of wrappers that died since the last registration. A finalizer only
#: appends here (it may run inside a registration, from the collector): the
#: bookkeeping happens under the lock at the next registration.
_released: collections.deque[str] = collections.deque()


def _new_lock_in_child() -> None:
    """After ``fork()``: a parent thread may have held the lock; it is not in the child."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


@dataclass(frozen=True, slots=True)
class Template:
    """What the generated wrapper does around ``func``.

    Attributes:
        is_async: Generate an ``async def`` that awaits ``func``.
        limiter: Take a token first: sync ``__opero_reserve()`` (checked by
            ``__opero_check_wait``, slept by ``__opero_sleep``) or async
            ``await __opero_take_token()``.
        keyed: With ``limiter``, book the token in the bucket of
            ``__opero_key(<the call's arguments>)`` (a callable ``rate_limit_key``):
            ``__opero_reserve(key)`` / ``await __opero_take_token(key)``.
        key_map: With ``keyed`` (sync): book in ``__opero_buckets[key]`` (a
            dict of native buckets) inline, calling ``__opero_reserve(key)``
            only when that fails (a new key, a non-``str``).
        on_success: Call ``__opero_on_success(result)`` after a success.
        guard: Wrap the call in ``try``/``except Exception`` handing the error
            to ``__opero_retry_from(exc, args, kwargs)``.
        breaker: Ask the circuit breaker ``__opero_cb`` first, when its
            ``_check`` flag says so (``__opero_enter()``), and record the outcome
            (``__opero_failed(exc, probe, args, kwargs)``; ``__opero_ok(probe)``
            when ``probe`` is truthy: a probe, or a failure streak to reset).
        breaker_await: The breaker's methods are awaited (state in Redis).
        clock: Read ``__opero_clock()`` once before anything else (``timeout``):
            a token wait is checked by ``__opero_token_deadline(wait, start)``
            and the start is handed to ``__opero_retry_from`` on a failure.
        count: Line 2 is the call counter of ``f.stats()``: ``next(__opero_runs)``
            while call counting is on, else ``pass`` (no cost); the two variants
            have the same lines, so :func:`opero._pipeline.stats.set_call_counting`
            swaps the wrapper's ``__code__`` at run time.
        count_always: Always count (never switched off).

    """

    is_async: bool = False
    limiter: bool = False
    keyed: bool = False
    key_map: bool = False
    on_success: bool = False
    guard: bool = False
    breaker: bool = False
    breaker_await: bool = False
    clock: bool = False
    count: bool = False
    count_always: bool = False


@dataclass(slots=True)
class _Signature:
    """``func``'s parameters as source: the ``def`` list, the call, args and kwargs."""

    params: list[str] = field(default_factory=list)
    call: list[str] = field(default_factory=list)
    positional: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)


def _signature(func: Callable[..., Any]) -> _Signature | None:
    """Return ``func``'s parameters as source, or ``None`` when it cannot be generated."""
    if not isinstance(func, types.FunctionType) or "__signature__" in func.__dict__:
        # Only the code's own parameters are trusted (a __signature__ may claim others).
        return None
    try:
        sig = inspect.signature(func, follow_wrapped=False)
    except (TypeError, ValueError):
        return None
    out = _Signature()
    kinds = inspect.Parameter
    in_positional_only = star_done = False
    for index, param in enumerate(sig.parameters.values()):
        name = param.name
        if name.startswith(PREFIX) or param.kind in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD):
            return None
        if unicodedata.normalize("NFKC", name) != name:
            # The parser folds identifiers to NFKC: generated source would say another name
            # (only a hand-built code object can have such a parameter).
            return None
        if param.kind is kinds.POSITIONAL_ONLY:
            in_positional_only = True
        elif in_positional_only:
            out.params.append("/")
            in_positional_only = False
        if param.kind is kinds.KEYWORD_ONLY:
            if not star_done:
                out.params.append("*")
                star_done = True
            out.call.append(f"{name}={name}")
            out.keywords.append(f"{name!r}: {name}")
        else:
            out.call.append(name)
            out.positional.append(name)
        if param.default is kinds.empty:
            out.params.append(name)
        else:
            out.defaults[f"{P}default_{index}"] = param.default
            out.params.append(f"{name}={P}default_{index}")
    if in_positional_only:
        out.params.append("/")
    return out


def _source(sig: _Signature, template: Template, counting: bool = False) -> str:
    """Return the source of ``__opero_wrapper`` for ``sig`` and ``template``."""
    aw = "await " if template.is_async else ""
    lines = [f"{'async ' if template.is_async else ''}def {P}wrapper({', '.join(sig.params)}):"]
    if template.count:
        # next() on the itertools.count: a builtin call, cheaper than its bound __next__.
        lines.append(f"    {P}next({P}runs)" if counting else "    pass")
    bw = "await " if template.breaker_await else ""
    if template.clock:
        lines.append(f"    {P}t0 = {P}clock()")
    if template.breaker:
        # A closed breaker without failures costs one attribute read and a local test.
        lines.append(f"    {P}p = {P}cb._check and ({bw}{P}enter())")
    key = f"{P}key({', '.join(sig.call)})" if template.keyed else ""
    # The caller's arguments, for on_failure's details when the token is past the deadline.
    given = f"({', '.join(sig.positional)}{',' if sig.positional else ''}), " + (
        "{" + ", ".join(sig.keywords) + "}"
    )
    deadline = [f"        {P}token_deadline({P}d, {P}t0, {given})"] if template.clock else []
    # Under timeout, check_wait is told the start: a wait past the deadline is no event.
    t0 = f", {P}t0" if template.clock else ""
    before = len(lines)
    if template.limiter and template.is_async:
        token_args = ", ".join(a for a in (key, f"{P}t0" if template.clock else "") if a)
        # take_token returns the seconds it waited: a retry's details count them in waited.
        lines.append(f"    {P}w = await {P}take_token({token_args})")
    elif template.limiter and template.key_map:
        # Stored keys are plain str: anything else (a new key, a digested long one, a
        # non-str, an unhashable or hash-hostile object) takes the checked slow path.
        # Only an exact str is looked up inline: the dict would trust any other object's
        # __hash__/__eq__ (a key claiming to equal "ann" would book in ann's bucket).
        lines += [
            f"    {P}k = {key}",
            f"    if {P}type({P}k) is {P}str:",
            "        try:",
            f"            {P}d = {P}buckets[{P}k].reserve()",
            f"        except {P}Exception:",
            f"            {P}d = {P}reserve({P}k)",
            "    else:",
            f"        {P}d = {P}reserve({P}k)",
            f"    if {P}d > {P}MIN_WAIT:",
            f"        {P}check_wait({P}d{t0})",
            *deadline,
            f"        {P}sleep({P}d)",
        ]
    elif template.limiter:
        lines += [
            f"    {P}d = {P}reserve({key})",
            f"    if {P}d > {P}MIN_WAIT:",
            f"        {P}check_wait({P}d{t0})",
        ]
        if template.clock:
            lines.append(f"        {P}token_deadline({P}d, {P}t0, {given})")
        lines.append(f"        {P}sleep({P}d)")
    if template.breaker and len(lines) > before:
        # A key function, a token wait or a sleep that raises (cancelled, interrupted,
        # RateLimitTimeout): the probe gives its slot back (no call was made).
        lines[before:] = [
            "    try:",
            *("    " + line for line in lines[before:]),
            f"    except {P}BaseException:",
            f"        if {P}p:",
            f"            {P}release({P}p)",
            "        raise",
        ]
    invoke = f"{aw}{P}func({', '.join(sig.call)})"
    args = f"({', '.join(sig.positional)}{',' if sig.positional else ''})"
    kwargs = "{" + ", ".join(sig.keywords) + "}"
    if template.guard or template.breaker:
        lines += ["    try:", f"        {P}r = {invoke}", f"    except {P}Exception as {P}e:"]
        if template.breaker:
            lines.append(f"        {bw}{P}failed({P}e, {P}p, {args}, {kwargs})")
        if template.guard:
            # The first call's token wait (slept only past MIN_WAIT) starts the loop's waited.
            if not template.limiter:
                waited = ""
            elif template.is_async:
                waited = f", {P}w"
            else:
                waited = f", {P}d if {P}d > {P}MIN_WAIT else 0.0"
            start = f"{P}t0" if template.clock else "None"
            tail = f", {start}{waited})" if template.clock or waited else ")"
            lines.append(f"        return {aw}{P}retry_from({P}e, {args}, {kwargs}{tail}")
        else:
            lines.append("        raise")
        if template.breaker:
            # Cancelled or interrupted: a probe gives its slot back (it decided nothing).
            lines += [
                f"    except {P}BaseException:",
                f"        if {P}p:",
                f"            {P}release({P}p)",
                "        raise",
            ]
    else:
        lines.append(f"    {P}r = {invoke}")
    if template.breaker:
        lines += [f"    if {P}p:", f"        {bw}{P}ok({P}p)"]
    if template.on_success:
        lines.append(f"    {P}on_success({P}r)")
    lines.append(f"    return {P}r")
    return "\n".join(lines) + "\n"


def register_source(source: str, label: str) -> str:
    """Put ``source`` in :mod:`linecache` and return its file name (shown in tracebacks).

    The caller passes the compiled wrapper to :func:`_track` so the entry is
    released when the last wrapper compiled from it is gone.
    """
    digest = hashlib.blake2b(source.encode(), digest_size=6).hexdigest()
    filename = f"<opero wrapper of {label} ({digest})>"
    entry = (len(source), None, source.splitlines(True), filename)
    with _lock:
        # Trim only when this adds an entry: re-registering a source changes nothing else.
        _forget_released(trim=filename not in linecache.cache)
        _dead.pop(filename, None)
        _live[filename] = _live.get(filename, 0) + 1
        # mtime None: linecache.checkcache() keeps the entry (no file to compare with).
        linecache.cache[filename] = entry
    return filename


def _forget_released(*, trim: bool) -> None:
    """Account for wrappers that died; with ``trim``, drop the oldest past ``KEEP_DEAD``.

    Called with the lock held.
    """
    while _released:
        filename = _released.popleft()
        count = _live.get(filename, 0) - 1
        if count > 0:
            _live[filename] = count
            continue
        _live.pop(filename, None)
        _dead[filename] = None
    while trim and len(_dead) > KEEP_DEAD:
        filename, _ = _dead.popitem(last=False)
        linecache.cache.pop(filename, None)


def _track(wrapper: Callable[..., Any], filename: str) -> None:
    """Note ``filename`` as released when ``wrapper`` is garbage."""
    weakref.finalize(wrapper, _released.append, filename).atexit = False


def specialize(
    func: Callable[..., Any], template: Template, namespace: dict[str, Any]
) -> Callable[..., Any] | None:
    """Generate the first-call wrapper with ``func``'s exact parameters, or return ``None``.

    Args:
        func: The function called on each attempt.
        template: What the wrapper does around the call.
        namespace: The helpers the template uses (``__opero_retry_from``, ...).

    """
    sig = _signature(func)
    if sig is None:
        return None
    source = _source(sig, template)
    label = f"{getattr(func, '__module__', None) or '?'}.{func.__qualname__}"
    scope: dict[str, Any] = {**namespace, **sig.defaults, f"{P}func": func}
    scope.setdefault(f"{P}MIN_WAIT", MIN_WAIT)
    scope[f"{P}Exception"] = Exception
    scope[f"{P}BaseException"] = BaseException
    scope[f"{P}type"], scope[f"{P}str"] = type, str
    scope[f"{P}next"] = next
    filename = register_source(source, label)
    counted = _source(sig, template, counting=True) if template.count else source
    try:
        counting = template.count_always or stats.counting_calls()
        exec(compile(counted if counting else source, filename, "exec"), scope)
    except BaseException:
        _released.append(filename)  # no wrapper holds the entry
        raise
    # Out of its own globals: no cycle, the wrapper dies with its last reference.
    wrapper: Callable[..., Any] = scope.pop(f"{P}wrapper")
    _track(wrapper, filename)
    if template.count and not template.count_always:
        stats.register_switch(wrapper, source, counted, filename)
    wrapper.__name__ = func.__name__
    wrapper.__qualname__ = func.__qualname__
    return wrapper
