"""Run a fault scenario in a fresh interpreter, so a hang or a crash fails a test, never CI.

Fault tests (forks, killed workers, signals, exit with busy threads, deadlocks) put
their scenario in a script and call :func:`run_scenario`. The script prints what it
saw; the test asserts on its exit status and output. A scenario that does not finish
within ``timeout`` seconds is killed with its whole process group and reported as a
hang, with whatever it printed so far.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Outcome:
    """What a scenario did: its exit status (negative: killed by that signal) and output."""

    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        """Return the non-empty lines the scenario printed on stdout."""
        return [line for line in self.stdout.splitlines() if line.strip()]


class ScenarioHung(AssertionError):
    """The scenario was still running at its deadline (a hang, or far too slow)."""


def run_scenario(
    source: str,
    *,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> Outcome:
    """Run ``source`` (dedented) with this interpreter in its own process group.

    Args:
        source: The Python program to run.
        timeout: Seconds before the group is killed and :class:`ScenarioHung` raised.
        env: Extra environment variables on top of this process's.
        args: Command-line arguments for the program (``sys.argv[1:]``).

    Returns:
        The scenario's :class:`Outcome`.

    Raises:
        ScenarioHung: It did not finish within ``timeout`` seconds.

    """
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONFAULTHANDLER", "1")
    full_env.update(env or {})
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise ScenarioHung(
            f"scenario still running after {timeout} s\n--- stdout\n{stdout[-3000:]}"
            f"\n--- stderr\n{stderr[-3000:]}"
        ) from None
    return Outcome(process.returncode, stdout, stderr)
