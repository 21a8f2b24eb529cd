"""Output of ``python -m opero bench``: the aligned table, the JSON document and the bar chart.

The table fits a 100-column terminal: one line per (operation, anchor) pair,
opero's figure on the first line of each operation.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from opero._bench._harness import ANCHOR_PACKAGES, AnchorRow, GroupResult, RowResult, Settings

__all__ = [
    "WIDTH",
    "Meta",
    "format_group_header",
    "format_row",
    "format_summary",
    "machine_info",
    "meets",
    "missing_anchors",
    "target_tally",
    "to_json",
    "write_plot",
]

WIDTH = 98
"""Width of every table line (fits a 100-column terminal)."""

_OP, _NUM, _ANCHOR, _RATIO, _TARGET = 27, 9, 24, 6, 12
INSTALL_HINT = 'pip install "opero[bench]"'


@dataclass(frozen=True)
class Meta:
    """What the header says about the run.

    Args:
        settings: The timing settings.
        empty_loop_ns: The cost of an empty generated loop, in ns per iteration.
        machine: From :func:`machine_info`.

    """

    settings: Settings
    empty_loop_ns: float
    machine: dict[str, Any]


def machine_info() -> dict[str, Any]:
    """Return the machine and interpreter facts kept with the figures."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        from opero import __version__ as opero_version
    except Exception as exc:  # the native module may be missing; say so in the output
        opero_version = f"unavailable ({type(exc).__name__})"
    return {
        "opero": opero_version,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.machine()}",
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg": load,
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str | None:
    """Return the CPU model name (from /proc/cpuinfo on Linux), or None if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _fmt_ns(ns: float) -> str:
    if ns < 10:
        return f"{ns:.2f}"
    if ns < 100:
        return f"{ns:.1f}"
    return f"{ns:,.0f}"


def _fmt_rate(per_s: float) -> str:
    if per_s >= 1e6:
        return f"{per_s / 1e6:.2f}M"
    if per_s >= 1e3:
        return f"{per_s / 1e3:.1f}k"
    return f"{per_s:.0f}"


def _fmt_figure(best_ns: float, unit: str) -> str:
    if unit == "items/s":
        return _fmt_rate(1e9 / best_ns) if best_ns > 0 else "inf"
    return _fmt_ns(best_ns)


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return ""
    if ratio < 0.01:
        return f"{ratio:.3f}x"  # e.g. tenacity: 0.004x, not a misleading 0.00x
    return f"{ratio:.2f}x" if ratio < 100 else f"{ratio:.0f}x"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _line(op: str, opero: str, anchor: str, figure: str, ratio: str, target: str) -> str:
    return (
        f"{_fit(op, _OP):<{_OP}}  {opero:>{_NUM}}  {_fit(anchor, _ANCHOR):<{_ANCHOR}}"
        f"  {figure:>{_NUM}}  {ratio:>{_RATIO}}  {target:<{_TARGET}}"
    ).rstrip()


def format_header(meta: Meta) -> str:
    """Return the lines printed once above the groups."""
    m, s = meta.machine, meta.settings
    load = " ".join(str(x) for x in m["loadavg"]) if m["loadavg"] else "n/a"
    lines = [
        f"opero bench: opero {m['opero']}, {m['python']}, {m['system']}",
        _fit(f"machine: {m['cpu_count']} CPUs ({m['processor'] or 'unknown model'})", WIDTH),
        f"  load average {load} when the run started (other work on the machine skews figures)",
        f"method: best of {s.repeat} runs of ~{s.target_ns / 1e6:g} ms each, opero and anchors "
        "interleaved",
        "  (perf_counter_ns, gc off, loops calibrated like timeit);",
        f"  nothing is subtracted: an empty loop costs {_fmt_ns(meta.empty_loop_ns)} ns/op "
        "and is inside every figure.",
        "  maps: one run = one whole map (after a warm-up map); items/s = items / best run.",
        "ratio = opero's time / the anchor's time: 0.50x means opero takes half the anchor's time;",
        "  below 1.00x opero is faster. target = the goal the issues set for that ratio.",
    ]
    return "\n".join(lines)


def format_group_header(result_title: str, unit: str) -> str:
    """Return the heading and column titles of one group."""
    better = "higher is better" if unit == "items/s" else "lower is better"
    title = f"== {result_title} ({unit}, {better}) "
    head = _line("operation", "opero", "anchor", "anchor", "ratio", "target")
    return f"\n{title:=<{WIDTH}}\n{head}\n{'-' * WIDTH}"


def meets(ratio: float, target: float) -> bool:
    """Return whether ``ratio`` meets ``target`` as printed (both at two decimals).

    Judging the printed figure keeps the table consistent: a ratio shown as
    1.10x never says MISS against a 1.1x target.
    """
    return round(ratio, 2) <= round(target, 2)


def _target_text(ratio: float | None, target: float | None) -> str:
    if target is None:
        return ""
    verdict = "" if ratio is None else (" ok" if meets(ratio, target) else " MISS")
    return f"<={_fmt_target(target)}x{verdict}"


def _fmt_target(target: float) -> str:
    return f"{target:.3g}" if target >= 1 else f"{target:.2g}"


def _anchor_cells(row: RowResult, anchor: AnchorRow, unit: str) -> tuple[str, str, str]:
    if anchor.status == "not installed":
        return "not installed", "", ""
    if anchor.status == "not available":
        return "n/a", "", ""
    if anchor.status == "error" or anchor.timing is None:
        return "error", "", ""
    ratio = row.ratio(anchor)
    return (
        _fmt_figure(anchor.timing.best_ns, unit),
        _fmt_ratio(ratio),
        _target_text(ratio, anchor.target),
    )


def format_row(row: RowResult, unit: str) -> str:
    """Return the table lines of one operation (one line per anchor)."""
    if row.status == "ok" and row.timing is not None:
        opero = _fmt_figure(row.timing.best_ns, unit)
    else:
        opero = "n/a" if row.status == "not available" else "ERROR"
    lines: list[str] = []
    abs_target = ""
    if row.max_ns is not None:
        ok = row.timing is not None and row.timing.best_ns <= row.max_ns
        verdict = "" if row.timing is None else (" ok" if ok else " MISS")
        abs_target = f"<={row.max_ns:g}ns{verdict}"
    anchors = row.anchors or [AnchorRow("", "none")]
    for i, anchor in enumerate(anchors):
        if anchor.status == "none":
            figure, ratio, target = "", "", ""
        else:
            figure, ratio, target = _anchor_cells(row, anchor, unit)
        if i == 0 and abs_target:
            target = target or abs_target
        label = anchor.label
        if anchor.status == "not installed":
            label = f"{anchor.label}"
        lines.append(
            _line(
                row.operation if i == 0 else "",
                opero if i == 0 else "",
                label,
                figure,
                ratio,
                target,
            )
        )
    if abs_target and anchors[0].target is not None:
        lines.append(_line("", "", "(opero's own figure)", "", "", abs_target))
    if row.status != "ok" and row.error:
        prefix = "  not available: " if row.status == "not available" else "  opero FAILED: "
        lines.extend(
            textwrap.wrap(row.error, WIDTH, initial_indent=prefix, subsequent_indent="    ")
        )
    for anchor in row.anchors:
        if anchor.status == "error" and anchor.error:
            lines.extend(
                textwrap.wrap(
                    anchor.error,
                    WIDTH,
                    initial_indent=f"  anchor {anchor.label} failed: ",
                    subsequent_indent="    ",
                )
            )
    return "\n".join(lines)


def format_group_error(result: GroupResult) -> str:
    """Return the lines that report a group which could not run at all."""
    return "\n".join(
        textwrap.wrap(
            result.error or "",
            WIDTH,
            initial_indent="  opero FAILED (group): ",
            subsequent_indent="    ",
        )
    )


def missing_anchors(results: Sequence[GroupResult]) -> dict[str, str]:
    """Return ``{module: distribution}`` of every anchor that was not installed."""
    missing: dict[str, str] = {}
    for result in results:
        for row in result.rows:
            for anchor in row.anchors:
                if anchor.status == "not installed" and anchor.module:
                    missing[anchor.module] = ANCHOR_PACKAGES.get(anchor.module, anchor.module)
    return missing


def target_tally(results: Sequence[GroupResult]) -> tuple[list[str], list[str]]:
    """Return (met, missed) descriptions of every target that could be judged."""
    met: list[str] = []
    missed: list[str] = []
    for result in results:
        for row in result.rows:
            if row.timing is None:
                continue
            if row.max_ns is not None:
                text = f"{row.operation}: {_fmt_ns(row.timing.best_ns)} ns <= {row.max_ns:g} ns"
                (met if row.timing.best_ns <= row.max_ns else missed).append(text)
            for anchor in row.anchors:
                ratio = row.ratio(anchor)
                if anchor.target is None or ratio is None:
                    continue
                limit = _fmt_target(anchor.target)
                text = f"{row.operation} vs {anchor.label}: {ratio:.2f}x <= {limit}x"
                (met if meets(ratio, anchor.target) else missed).append(text)
    return met, missed


def format_summary(results: Sequence[GroupResult], elapsed_s: float) -> str:
    """Return the closing lines: missing anchors, targets, failures, unavailable pieces."""
    lines = [f"\n{'=' * WIDTH}"]
    missing = missing_anchors(results)
    if missing:
        names = ", ".join(f"{m} ({d})" for m, d in sorted(missing.items()))
        lines.append(f"anchors not installed: {names}")
        lines.append(f"  install every anchor with: {INSTALL_HINT}")
    else:
        lines.append("every anchor is installed")
    met, missed = target_tally(results)
    lines.append(f"targets: {len(met)} met, {len(missed)} missed")
    lines.extend(f"  MISS {text}" for text in missed)
    unavailable = [
        r.group.name for r in results if any(row.status == "not available" for row in r.rows)
    ]
    if unavailable:
        lines.append(f"not available yet (opero piece not built): {', '.join(unavailable)}")
    failed = [r.group.name for r in results if r.failed]
    if failed:
        lines.append(
            f"FAILED groups (an opero piece raised or gave a wrong answer): "
            f"{', '.join(failed)}; exit status 1"
        )
    lines.append(f"done in {elapsed_s:.1f} s")
    return "\n".join(lines)


def _timing_json(best_ns: float, median_ns: float, loops: int, runs: int) -> dict[str, Any]:
    return {
        "best_ns": best_ns,
        "median_ns": median_ns,
        "items_per_s": 1e9 / best_ns if best_ns > 0 else None,
        "loops": loops,
        "runs": runs,
    }


def to_json(meta: Meta, results: Sequence[GroupResult], elapsed_s: float, status: int) -> str:
    """Return the JSON document of a run: every figure, ratio, version and the machine."""
    groups: list[dict[str, Any]] = []
    for result in results:
        rows: list[dict[str, Any]] = []
        for row in result.rows:
            t = row.timing
            anchors: list[dict[str, Any]] = []
            for a in row.anchors:
                ratio = row.ratio(a)
                anchors.append(
                    {
                        "label": a.label,
                        "status": a.status,
                        "module": a.module,
                        "version": a.version,
                        "timing": _timing_json(
                            a.timing.best_ns, a.timing.median_ns, a.timing.loops, a.timing.runs
                        )
                        if a.timing
                        else None,
                        "ratio": ratio,
                        "target_max_ratio": a.target,
                        "target_met": None
                        if a.target is None or ratio is None
                        else meets(ratio, a.target),
                        "error": a.error,
                    }
                )
            rows.append(
                {
                    "operation": row.operation,
                    "status": row.status,
                    "error": row.error,
                    "items_per_job": row.ops,
                    "opero": _timing_json(t.best_ns, t.median_ns, t.loops, t.runs) if t else None,
                    "target_max_ns": row.max_ns,
                    "anchors": anchors,
                }
            )
        groups.append(
            {
                "name": result.group.name,
                "title": result.group.title,
                "unit": result.group.unit,
                "failed": result.failed,
                "error": result.error,
                "seconds": round(result.seconds, 3),
                "rows": rows,
            }
        )
    met, missed = target_tally(results)
    doc = {
        "schema": 1,
        "ratio": "opero time / anchor time (lower is better for opero)",
        "machine": meta.machine,
        "method": {
            "clock": "time.perf_counter_ns",
            "target_ms_per_run": meta.settings.target_ns / 1e6,
            "repeat": meta.settings.repeat,
            "statistic": "best of repeat (median also given)",
            "empty_loop_ns": meta.empty_loop_ns,
            "subtracted": "nothing",
            "quick": meta.settings.quick,
        },
        "missing_anchors": missing_anchors(results),
        "anchor_versions": {
            a.module: a.version
            for result in results
            for row in result.rows
            for a in row.anchors
            if a.module and a.version
        },
        "targets": {"met": met, "missed": missed},
        "groups": groups,
        "elapsed_s": round(elapsed_s, 3),
        "exit_status": status,
    }
    return json.dumps(doc, indent=2)


def write_plot(results: Sequence[GroupResult], path: Path, meta: Meta) -> None:
    """Draw opero against each anchor as horizontal bars (time per op, log scale) into ``path``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (``pip install "opero[plot]"``).

    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One bar per implementation: (y position, label, ns, is_opero, note); a gap between operations.
    Bar = tuple[float, str, float, bool, str]
    panels: list[tuple[GroupResult, list[Bar]]] = []
    for result in results:
        bars: list[Bar] = []
        y = 0.0
        for row in result.rows:
            if row.timing is None:
                continue
            bars.append((y, f"{row.operation}: opero", row.timing.best_ns, True, ""))
            y -= 1
            for a in row.anchors:
                if a.timing is not None:
                    note = f"opero {_fmt_ratio(row.ratio(a))}"
                    bars.append((y, a.label, a.timing.best_ns, False, note))
                    y -= 1
            y -= 0.6
        if bars:
            panels.append((result, bars))
    if not panels:
        raise ValueError("nothing to plot: no group produced an opero figure")
    heights = [max(1.8, 0.26 * (len(b) + 0.6 * len(r.rows)) + 0.9) for r, b in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, sum(heights) + 0.6),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
        layout="constrained",
    )
    for ax, (result, bars) in zip(axes[:, 0], panels, strict=True):
        ys = [b[0] for b in bars]
        values = [b[2] for b in bars]
        colors = ["#d9480f" if b[3] else "#868e96" for b in bars]
        # Bars start at a power of ten below the smallest figure, so lengths compare fairly.
        left = 10 ** math.floor(math.log10(min(values) / 1.5))
        ax.barh(ys, [v - left for v in values], left=left, color=colors, height=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([b[1] for b in bars], fontsize=8)
        for tick, b in zip(ax.get_yticklabels(), bars, strict=True):
            if b[3]:
                tick.set_fontweight("bold")
        ax.set_xscale("log")
        ax.set_xlim(left, max(values) * 5)  # room for the ratio labels
        per = {"items/s": "ns per item", "ns/op": "ns per op"}.get(unit := result.group.unit, unit)
        ax.set_xlabel(f"{per} (log scale; shorter is better)", fontsize=8)
        ax.set_title(result.group.title, fontsize=10, loc="left")
        for y, _, ns, _, note in bars:
            if note:
                ax.text(ns, y, f" {note}", va="center", fontsize=7)
        ax.grid(axis="x", which="both", alpha=0.25)
    m = meta.machine
    fig.suptitle(
        f"opero {m['opero']} against its anchors ({m['python']}, {m['cpu_count']} CPUs, "
        f"load {m['loadavg'][0] if m['loadavg'] else 'n/a'}); "
        "opero x = opero's time / the anchor's time",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_lines(text: str, stream: TextIO | None = None) -> None:
    """Print ``text`` and flush, so a long run shows progress."""
    out = stream or sys.stdout
    out.write(text + "\n")
    out.flush()
