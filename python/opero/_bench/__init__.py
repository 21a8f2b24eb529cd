"""The comparison benchmark behind ``python -m opero bench``.

Every group times opero's piece and the alternatives installed beside it in
this one process and this one run, and reports ``opero time / anchor time``.
The timing method is described in :mod:`opero._bench._harness` and printed in
the report header.
"""

from __future__ import annotations

import faulthandler
import functools
import importlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from opero._bench._harness import (
    Case,
    Group,
    GroupResult,
    RowResult,
    Settings,
    empty_loop_ns,
    run_group,
)
from opero._bench._report import (
    Meta,
    format_group_error,
    format_group_header,
    format_header,
    format_row,
    format_summary,
    machine_info,
    print_lines,
    to_json,
    write_plot,
)

__all__ = ["GROUP_MODULES", "GROUP_TIMEOUT_S", "BenchOptions", "all_groups", "run_bench"]

GROUP_MODULES: tuple[str, ...] = ("_core", "_cache", "_retry", "_ratelimit", "_map", "_backends")
"""Modules of ``opero._bench`` that define groups, in report order."""
GROUP_MODULES += ("_hitratio",)  # opt-in (--only hitratio): misses per 1,000 requests

GROUP_TIMEOUT_S = 600.0
"""Seconds one group may take before the run is aborted with its stack traces (exit 1)."""


@dataclass(frozen=True)
class BenchOptions:
    """What the command line asked for.

    Args:
        settings: Timing settings.
        only: Group names to run; empty for the default groups.
        json_path: Where to write the JSON document, or ``None``.
        plot_path: Where to write the PNG chart, or ``None``.

    """

    settings: Settings
    only: tuple[str, ...] = ()
    json_path: Path | None = None
    plot_path: Path | None = None


def all_groups() -> list[Group]:
    """Return every group, in report order.

    A group module that fails to import becomes a group that reports the
    error when it runs, so one broken module does not hide the others.
    """
    groups: list[Group] = []
    for name in GROUP_MODULES:
        try:
            module = importlib.import_module(f"opero._bench.{name}")
        except Exception as exc:
            groups.append(_broken_group(name.lstrip("_"), exc))
            continue
        groups.extend(getattr(module, "GROUPS", None) or [module.GROUP])
    return groups


def _broken_group(name: str, exc: Exception) -> Group:
    def build(settings: Settings) -> list[Case]:
        raise RuntimeError(f"opero._bench._{name} failed to import") from exc

    return Group(name, f"{name} (module failed to import: {exc!r})", "ns/op", build)


def select_groups(only: Sequence[str]) -> list[Group]:
    """Return the groups named in ``only`` (``-`` and ``_`` alike), or the default ones.

    Raises:
        ValueError: A name is not a group; the message lists the valid names.

    """
    groups = all_groups()
    if not only:
        return [g for g in groups if g.default]
    by_name = {g.name: g for g in groups}
    wanted = [n.strip().replace("-", "_") for n in only if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        valid = ", ".join(by_name)
        raise ValueError(f"--only: unknown group {', '.join(unknown)}; valid groups: {valid}")
    return [g for g in groups if g.name in wanted]


def _arm_watchdog() -> bool:
    """Arm the per-group timeout on the real stderr; return False where there is none."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                faulthandler.dump_traceback_later(GROUP_TIMEOUT_S, exit=True, file=stream)
                return True
        except (AttributeError, ValueError, OSError):  # no fileno (captured stream)
            continue
    return False


def _print_row(unit: str, row: RowResult) -> None:
    print_lines(format_row(row, unit))


def run_bench(options: BenchOptions) -> int:
    """Run the selected groups, print the table, write JSON/plot; return the exit status.

    The status is 1 when an opero piece raised or gave a wrong answer in any
    group (or the plot could not be written), else 0.
    """
    start = time.perf_counter()
    groups = select_groups(options.only)
    meta = Meta(options.settings, empty_loop_ns(options.settings), machine_info())
    print_lines(format_header(meta))
    results: list[GroupResult] = []
    for group in groups:
        print_lines(format_group_header(group.title, group.unit))
        # A hung opero piece (a pool that never returns) must not hang CI: after
        # GROUP_TIMEOUT_S every thread's stack is printed and the process exits with 1.
        watchdog = _arm_watchdog()
        try:
            result = run_group(group, options.settings, functools.partial(_print_row, group.unit))
        finally:
            if watchdog:
                faulthandler.cancel_dump_traceback_later()
        if result.error:
            print_lines(format_group_error(result))
        results.append(result)
    elapsed = time.perf_counter() - start
    status = 1 if any(r.failed for r in results) else 0
    if options.plot_path is not None:
        try:
            write_plot(results, options.plot_path, meta)
            print_lines(f"\nplot written to {options.plot_path}")
        except ModuleNotFoundError:
            print_lines('\n--plot needs matplotlib: pip install "opero[plot]"')
            status = 1
        except (OSError, ValueError) as exc:
            print_lines(f"\n--plot could not be written: {exc}")
            status = 1
    print_lines(format_summary(results, elapsed))
    if options.json_path is not None:
        options.json_path.write_text(to_json(meta, results, elapsed, status) + "\n")
        print_lines(f"figures written to {options.json_path}")
    return status
