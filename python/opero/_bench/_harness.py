"""Timing harness of ``python -m opero bench``: cases, anchors, calibration, results.

Method (printed in the report header too):

* Clock: :func:`time.perf_counter_ns`.
* Micro cases (ns/op): the operation is written literally inside a generated
  ``for _ in itertools.repeat(None, n)`` loop, the way :mod:`timeit` does it, so
  no ``*args`` splat or extra call sits between the loop and the operation. The
  loop count ``n`` is calibrated per implementation (grown until one run takes
  a fifth of the target time, default 100 ms, then scaled to the target). Then
  every implementation of an operation is timed ``repeat`` times, round-robin
  (opero, anchor 1, anchor 2, opero, ...), so load from elsewhere on the
  machine hits all of them alike; the *best* run gives ns/op (the median is
  kept in the JSON output). The garbage collector is disabled while a run is
  timed, as :mod:`timeit` does.
* Nothing is subtracted: the loop's own cost (printed as "empty loop") is
  inside every figure, opero's and the anchors' alike.
* Whole-job cases (parallel maps): one run is one complete map over N items,
  after one warm-up map (pools started); the best of ``repeat`` interleaved
  runs gives ns/item and items/s.
* Ratios are always ``opero time / anchor time`` from the same process and the
  same run: ``0.50x`` means opero takes half the anchor's time (lower is better).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import itertools
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ANCHOR_PACKAGES",
    "AnchorRow",
    "Case",
    "CheckError",
    "Figure",
    "Group",
    "GroupResult",
    "Impl",
    "RowResult",
    "Settings",
    "Timing",
    "Unavailable",
    "call_loop",
    "check",
    "empty_loop_ns",
    "run_group",
]

LoopFn = Callable[[int], object]
"""A callable that performs ``n`` operations (micro cases) or one job (``once`` cases)."""

ANCHOR_PACKAGES: dict[str, str] = {
    "cachetools": "cachetools",
    "cachebox": "cachebox",
    "moka_py": "moka-py",
    "tenacity": "tenacity",
    "backoff": "backoff",
    "pyrate_limiter": "pyrate-limiter",
    "aiolimiter": "aiolimiter",
    "distributed": "distributed",
    "redis": "redis",
    "diskcache": "diskcache",
}
"""Optional anchor modules and the distribution that provides each one."""


class Unavailable(RuntimeError):
    """A case cannot run on this machine (a service binary is missing): "not available"."""


class Figure(float):
    """A figure a loop measured itself instead of a time (a miss count): reported as is."""


class CheckError(AssertionError):
    """An implementation gave a wrong answer before it was timed."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`CheckError` with ``message`` when ``condition`` is false.

    Used by cases to prove the thing being timed really does its job (a cache
    that never hits must not look fast).

    Args:
        condition: What must hold.
        message: What went wrong, shown in the report.

    """
    if not condition:
        raise CheckError(message)


@dataclass(frozen=True)
class Settings:
    """How long to time each implementation.

    Args:
        target_ns: Length of one timed run of a micro case, in nanoseconds.
        repeat: Timed runs per implementation; the best one counts.
        quick: Whether whole-job cases use their small sizes.

    """

    target_ns: int = 100_000_000
    repeat: int = 5
    quick: bool = False

    @property
    def max_loops(self) -> int:
        """Upper bound on a calibrated loop count (guards a broken clock)."""
        return 100_000_000


@dataclass(frozen=True)
class Timing:
    """The figures of one implementation.

    Args:
        best_ns: Best time per operation, in nanoseconds.
        median_ns: Median time per operation over the runs, in nanoseconds.
        loops: Operations per timed run.
        runs: Number of timed runs.

    """

    best_ns: float
    median_ns: float
    loops: int
    runs: int


@dataclass
class Impl:
    """One implementation of an operation: opero's or an anchor's.

    Args:
        label: Name shown in the table (``functools.lru_cache``).
        make: Called once inside the group's exit stack; returns the loop.
            It may register cleanups on the stack and must check correctness.
        requires: Modules that must import for the anchor to run.
        once: Whether the loop is a whole job (parallel maps) of ``ops`` items.
        ops: Items per job for ``once`` implementations.

    """

    label: str
    make: Callable[[contextlib.ExitStack], LoopFn]
    requires: tuple[str, ...] = ()
    once: bool = False
    ops: int = 1


@dataclass
class Case:
    """One row group of the table: opero's implementation and its anchors.

    Args:
        operation: What is timed, short (fits 28 columns).
        opero: opero's implementation.
        anchors: The alternatives, in display order.
        targets: Maximum ratio opero/anchor the issues set, by anchor label.
        max_ns: An absolute target on opero's own figure, in ns/op.

    """

    operation: str
    opero: Impl
    anchors: list[Impl]
    targets: dict[str, float] = field(default_factory=dict)
    max_ns: float | None = None


@dataclass(frozen=True)
class Group:
    """A concern of the benchmark (cache hit, retry success, ...).

    Args:
        name: The ``--only`` name.
        title: The heading in the table.
        unit: ``"ns/op"`` or ``"items/s"`` (the latter for whole-job cases).
        build: Returns the group's cases for the given settings.
        default: Whether the group runs without ``--only``.

    """

    name: str
    title: str
    unit: str
    build: Callable[[Settings], list[Case]]
    default: bool = True


@dataclass
class AnchorRow:
    """The result of one anchor in one case.

    Args:
        label: The anchor's table label.
        status: ``"ok"``, ``"not installed"``, ``"not available"`` (it raised
            :class:`Unavailable`: a service binary is missing) or ``"error"``.
        timing: Its figures when ``status == "ok"``.
        module: The first required module (for the install hint).
        version: The installed version of that module's distribution.
        error: The error text when ``status == "error"``.
        target: The maximum ratio the issues set, if any.

    """

    label: str
    status: str
    timing: Timing | None = None
    module: str | None = None
    version: str | None = None
    error: str | None = None
    target: float | None = None


@dataclass
class RowResult:
    """The result of one case.

    Args:
        operation: The case's operation text.
        status: ``"ok"``, ``"not available"`` (the opero piece is not built) or ``"error"``.
        timing: opero's figures when ``status == "ok"``.
        anchors: One result per anchor.
        error: The error text when opero failed.
        max_ns: An absolute target on opero's figure, if any.
        ops: Items per job for whole-job cases, else 1.

    """

    operation: str
    status: str
    timing: Timing | None
    anchors: list[AnchorRow]
    error: str | None = None
    max_ns: float | None = None
    ops: int = 1

    def ratio(self, anchor: AnchorRow) -> float | None:
        """Return opero's time over the anchor's, or ``None`` if either is missing."""
        if self.timing is None or anchor.timing is None or anchor.timing.best_ns <= 0:
            return None
        return self.timing.best_ns / anchor.timing.best_ns


@dataclass
class GroupResult:
    """The result of one group.

    Args:
        group: The group that ran.
        rows: Results of its cases, in order.
        error: Set when the group could not even be built (traceback summary).
        seconds: Wall time the group took.

    """

    group: Group
    rows: list[RowResult]
    error: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """Whether an opero piece of this group raised or gave a wrong answer."""
        return self.error is not None or any(r.status == "error" for r in self.rows)


def call_loop(stmt: str, namespace: dict[str, Any], *, is_async: bool = False) -> LoopFn:
    """Compile a loop that runs ``stmt`` ``n`` times, with names from ``namespace``.

    The statement is written literally in the loop body (like :mod:`timeit`),
    so ``f(1, 2, 3, a=4, b=5)`` costs what it costs in user code.

    Args:
        stmt: One statement, e.g. ``"f(1)"`` or ``"await f(1)"``.
        namespace: Globals of the generated function (the callables it uses).
        is_async: Run ``stmt`` inside a coroutine on ``namespace["loop"]``
            (an :class:`asyncio.AbstractEventLoop`), which must be given.

    Returns:
        A function of ``n`` that performs the operation ``n`` times.

    """
    ns: dict[str, Any] = dict(namespace)
    ns["_repeat"] = itertools.repeat
    if is_async:
        src = (
            "async def _body(_n):\n"
            "    for _ in _repeat(None, _n):\n"
            f"        {stmt}\n"
            "def _loop(_n):\n"
            "    loop.run_until_complete(_body(_n))\n"
        )
    else:
        src = f"def _loop(_n):\n    for _ in _repeat(None, _n):\n        {stmt}\n"
    exec(compile(src, f"<opero bench: {stmt}>", "exec"), ns)
    fn: LoopFn = ns["_loop"]
    return fn


def _run_timed(loop: LoopFn, n: int) -> float:
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        out = loop(n)
        return out if isinstance(out, Figure) else time.perf_counter_ns() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def _calibrate(loop: LoopFn, settings: Settings) -> int:
    """Return a loop count whose run takes about ``settings.target_ns``."""
    n = 1
    while True:
        elapsed = _run_timed(loop, n)
        if elapsed >= settings.target_ns // 5 or n >= settings.max_loops:
            break
        # Grow fast while runs are far too short; a run of >= 1/5 target is enough to scale.
        n *= 10 if elapsed < settings.target_ns // 100 else 2
    per_op = max(elapsed, 1) / n
    return max(1, min(settings.max_loops, math.ceil(settings.target_ns / per_op)))


@dataclass
class _Slot:
    """One implementation of a case on its way through preparation and the timed rounds."""

    impl: Impl
    loop: LoopFn | None = None
    loops: int = 1
    runs: list[float] = field(default_factory=list)
    error: BaseException | None = None

    def prepare(self, stack: contextlib.ExitStack, settings: Settings) -> None:
        """Build the loop (checks included) and calibrate it, or warm a whole job up."""
        try:
            self.loop = self.impl.make(stack)
            if self.impl.once:
                self.loop(1)  # warm-up: pools started, caches of the interpreter filled
            else:
                self.loops = _calibrate(self.loop, settings)
        except Exception as exc:
            self.error = exc

    def run_once(self) -> None:
        """Time one run and keep its per-operation figure; an exception stops this slot."""
        if self.loop is None or self.error is not None:
            return
        try:
            elapsed = _run_timed(self.loop, self.loops)
        except Exception as exc:
            self.error = exc
            return
        self.runs.append(elapsed / (self.impl.ops if self.impl.once else self.loops))

    def timing(self) -> Timing | None:
        """Return the figures, or None if the slot failed or never ran."""
        if self.error is not None or not self.runs:
            return None
        loops = self.impl.ops if self.impl.once else self.loops
        return Timing(min(self.runs), statistics.median(self.runs), loops, len(self.runs))


def measure_interleaved(slots: Sequence[_Slot], settings: Settings) -> None:
    """Time every prepared slot ``settings.repeat`` times, round-robin.

    Interleaving the runs (opero, anchor 1, anchor 2, opero, ...) means a burst
    of load from elsewhere on the machine hits every implementation alike
    instead of skewing whichever was being timed, which keeps ratios honest.
    """
    for _ in range(settings.repeat):
        for slot in slots:
            slot.run_once()


def empty_loop_ns(settings: Settings) -> float:
    """Return the best ns per iteration of an empty generated loop (the loop's own cost)."""
    loop = call_loop("pass", {})
    n = _calibrate(loop, settings)
    return min(_run_timed(loop, n) / n for _ in range(max(3, settings.repeat)))


def _error_text(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _missing_module(modules: Sequence[str]) -> str | None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def _version(module: str) -> str | None:
    dist = ANCHOR_PACKAGES.get(module, module)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        mod = importlib.import_module(module)
        version = getattr(mod, "__version__", None)
        return str(version) if version is not None else None


def _not_built(exc: BaseException) -> bool:
    return isinstance(exc, (NotImplementedError, Unavailable))


def _run_case(case: Case, settings: Settings, stack: contextlib.ExitStack) -> RowResult:
    ops = case.opero.ops if case.opero.once else 1
    missing = _missing_module(case.opero.requires)
    if missing is not None:
        skipped = [AnchorRow(a.label, "not installed", module=missing) for a in case.anchors]
        why = f"needs {missing} ({ANCHOR_PACKAGES.get(missing, missing)}), not installed"
        return RowResult(case.operation, "not available", None, skipped, why, case.max_ns, ops)
    opero = _Slot(case.opero)
    installed: list[_Slot] = []
    anchors: list[AnchorRow] = []
    for impl in case.anchors:
        target = case.targets.get(impl.label)
        absent = _missing_module(impl.requires)
        module = impl.requires[0] if impl.requires else None
        if absent is not None:
            anchors.append(AnchorRow(impl.label, "not installed", module=absent, target=target))
            continue
        version = _version(module) if module else None
        anchors.append(AnchorRow(impl.label, "ok", module=module, version=version, target=target))
        installed.append(_Slot(impl))
    slots = [opero, *installed]
    for slot in slots:
        slot.prepare(stack, settings)
    measure_interleaved(slots, settings)
    # Fill in the anchors' results (an anchor's failure is reported, never fatal).
    by_label = {slot.impl.label: slot for slot in installed}
    for row in anchors:
        slot_or_none = by_label.get(row.label) if row.status == "ok" else None
        if slot_or_none is None:
            continue
        row.timing = slot_or_none.timing()
        if slot_or_none.error is not None:
            # A service missing here (no redis-server) is not the anchor's failure.
            status = "not available" if _not_built(slot_or_none.error) else "error"
            row.status, row.error = status, _error_text(slot_or_none.error)
    timing = opero.timing()
    error: str | None = None
    status = "ok"
    if opero.error is not None:
        status = "not available" if _not_built(opero.error) else "error"
        error = _error_text(opero.error)
    return RowResult(case.operation, status, timing, anchors, error, case.max_ns, ops)


def run_group(
    group: Group,
    settings: Settings,
    on_row: Callable[[RowResult], None] | None = None,
) -> GroupResult:
    """Build and time every case of ``group``; never raises for a failing piece.

    Args:
        group: The group to run.
        settings: Target time and repeats.
        on_row: Called with each row as soon as it is timed (live output).

    Returns:
        The group's results; opero failures are in the rows' ``status``.

    """
    start = time.perf_counter()
    rows: list[RowResult] = []
    error: str | None = None
    stack = contextlib.ExitStack()
    try:
        cases = group.build(settings)
    except Exception as exc:
        stack.close()
        if _not_built(exc):
            rows.append(RowResult("(group)", "not available", None, [], _error_text(exc)))
            return GroupResult(group, rows, None, time.perf_counter() - start)
        return GroupResult(group, rows, _error_text(exc), time.perf_counter() - start)
    try:
        for case in cases:
            # _run_case reports every failure of a case in its row; what on_row raises
            # (a closed stdout, say) is not a benchmark result and propagates.
            row = _run_case(case, settings, stack)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        try:
            stack.close()
        except Exception as exc:  # a pool or server that fails to stop is reported
            error = f"cleanup failed: {_error_text(exc)}"
    return GroupResult(group, rows, error, time.perf_counter() - start)
