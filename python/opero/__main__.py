"""Command line of opero: ``python -m opero bench`` times opero against its alternatives.

Run ``python -m opero bench --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

_BENCH_EPILOG = """\
groups (--only): core, cache_hit, cache_miss, retry, ratelimit, map (the default run);
  opt-in: dask (starts a LocalCluster), redis (starts a private redis-server on a free
  port when the binary exists), disk (a disk cache in a temporary directory).
  also opt-in: hitratio (misses per 1,000 requests on three Zipf traces, about 10 s).

Figures are ns per operation (items/s for maps); the ratio is opero's time over the
anchor's from the same run, so 0.50x means opero takes half the anchor's time.
Anchors that are not installed are listed at the end; install them all with
  pip install "opero[bench]"
The exit status is 1 when a part of opero raised or gave a wrong answer, 130 after Ctrl-C.
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of milliseconds, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m opero``."""
    parser = argparse.ArgumentParser(
        prog="python -m opero",
        description="opero: resilient and parallel Python functions. "
        "The 'bench' command compares opero with the alternatives installed beside it.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser(
        "bench",
        help="time opero against functools, cachetools, tenacity, ... in one run",
        description="Time opero's pieces against the pure-Python and library alternatives\n"
        "installed beside it, in one process and one run, and print a table of figures\n"
        "and ratios grouped by concern.",
        epilog=_BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="shorter runs and smaller maps: under a minute (default run: a few minutes)",
    )
    bench.add_argument("--json", metavar="FILE", type=Path, help="write the raw figures as JSON")
    bench.add_argument(
        "--plot",
        metavar="FILE.png",
        type=Path,
        help='draw the comparison as a bar chart (needs matplotlib: pip install "opero[plot]")',
    )
    bench.add_argument(
        "--only",
        metavar="GROUP,...",
        default="",
        help="run only these groups, comma-separated (see the list below)",
    )
    bench.add_argument(
        "--budget-ms",
        metavar="MS",
        type=_positive_float,
        help="length of one timed run in ms (default 100, 40 with --quick); tiny values "
        "give fast, rough figures (used by the tests)",
    )
    bench.add_argument(
        "--repeat",
        metavar="N",
        type=_positive_int,
        help="timed runs per implementation, the best counts (default 5, 3 with --quick)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "bench":
        parser.print_help()
        return 2
    from opero._bench import BenchOptions, run_bench, select_groups
    from opero._bench._harness import Settings

    budget_ms = args.budget_ms if args.budget_ms is not None else (40.0 if args.quick else 100.0)
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 5)
    only = tuple(n for n in args.only.split(",") if n.strip())
    try:
        select_groups(only)
    except ValueError as exc:
        parser.error(str(exc))
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        parser.error(f"--plot: expected a .png file name, got {str(args.plot)!r}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        # Checked now, not after a run of minutes that could then not be saved.
        if path is not None and not path.resolve().parent.is_dir():
            parser.error(f"{flag}: the folder of {str(path)!r} does not exist")
    settings = Settings(target_ns=int(budget_ms * 1e6), repeat=repeat, quick=args.quick)
    try:
        return run_bench(BenchOptions(settings, only, args.json, args.plot))
    except KeyboardInterrupt:
        # Ctrl-C: the groups' cleanups (pools, the private redis-server) have run on the way out.
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
