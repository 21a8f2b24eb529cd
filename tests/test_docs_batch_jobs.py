"""Claims of ``docs/batch-jobs.md`` that need more than "the example runs".

The page's blocks run in ``tests/test_docs_examples.py`` (their own asserts
check the cache misses of a rerun and the failed indices). Here: a real Ctrl-C
and a real crash of a disk-cached process map leave every finished result on
disk, so a rerun in a new process resumes; and what the page found the
streaming progress bar and spawned workers' tracebacks do not do yet.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import signal
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from faultkit import run_scenario
from opero import opmap

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diskcache") is None, reason="the disk cache needs diskcache"
)

# One run of a disk-cached process map over 200 items of ~20 ms (two workers,
# jobs of 5 items). argv: cache dir, log of the items computed (a line per
# call, appended by the workers), and "SIGINT", "SIGKILL" or "-". With a
# signal, the parent sends it to itself once 40 items have been computed.
RUN = """
import os
import signal
import sys
import threading
import time
import warnings

from opero import opmap

CACHE_DIR, LOG, STOP = sys.argv[1], sys.argv[2], sys.argv[3]


def score(n: int) -> int:
    with open(LOG, "a") as log:
        log.write(f"{n}\\n")
    time.sleep(0.02)
    return n * n


score_all = opmap(
    mode="process", workers=2, retries=0, chunksize=5, progress=False,
    cache=True, cache_backend="disk", cache_dir=CACHE_DIR,
)(score)


def stop_after_40() -> None:
    while len(open(LOG).read().split()) < 40:
        time.sleep(0.005)
    os.kill(os.getpid(), getattr(signal, STOP))


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    open(LOG, "w").close()
    if STOP != "-":
        threading.Thread(target=stop_after_40, daemon=True).start()
    try:
        results = score_all(range(200))
    except KeyboardInterrupt:
        print("interrupted")
        sys.exit(0)
    assert results == [n * n for n in range(200)], results
    print("misses", score_all.item_function.cache_info().misses)
"""


def _computed(log: Path) -> list[int]:
    """Return the items a run computed, from its log."""
    return [int(n) for n in log.read_text().split()]


@pytest.mark.parametrize("stop", ["SIGINT", "SIGKILL"])
def test_a_rerun_after_an_interrupt_or_crash_resumes_from_the_disk_cache(
    tmp_path: Path, stop: str
) -> None:
    """After Ctrl-C or SIGKILL mid-map, a rerun skips the stored items; the next one runs none."""
    cache = str(tmp_path / "cache")
    first = run_scenario(RUN, timeout=120, args=(cache, str(tmp_path / "1.log"), stop))
    if stop == "SIGINT":
        assert first.returncode == 0, first
        assert first.lines() == ["interrupted"], first
    else:
        assert first.returncode == -signal.SIGKILL, first
    stopped_at = len(_computed(tmp_path / "1.log"))
    assert 40 <= stopped_at < 200, stopped_at  # it did stop half way

    rerun = run_scenario(RUN, timeout=120, args=(cache, str(tmp_path / "2.log"), "-"))
    assert rerun.returncode == 0, rerun
    resumed = _computed(tmp_path / "2.log")
    assert rerun.lines() == [f"misses {len(resumed)}"]
    assert 200 - stopped_at <= len(resumed) < 200  # finished items were skipped
    assert len(set(resumed)) == len(resumed)  # and none ran twice in the rerun

    third = run_scenario(RUN, timeout=120, args=(cache, str(tmp_path / "3.log"), "-"))
    assert third.returncode == 0, third
    assert third.lines() == ["misses 0"], third
    assert _computed(tmp_path / "3.log") == []


def _summary(call: Callable[[], object]) -> str:
    """Return the summary line a forced progress bar writes for ``call()``."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call()
    return stderr.getvalue().splitlines()[-1]


def _flaky(x: int) -> int:
    if x % 5 == 0:
        raise ValueError(x)
    return x


def test_list_call_progress_summary_counts_failures_and_cache_hits() -> None:
    """The list call's summary line counts the failed items and, on a rerun, the cached ones."""
    mapped = opmap(mode="thread", workers=2, retries=0, cache=True, progress="force")(_flaky)
    first, rerun = _summary(lambda: mapped(range(20))), _summary(lambda: mapped(range(20)))
    assert first.startswith("opmap _flaky: 20 done, 4 failed, 0 cached"), first
    assert rerun.startswith("opmap _flaky: 20 done, 4 failed, 16 cached"), rerun


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_stream_progress_summary_counts_failures(mode: str) -> None:
    """``imap``'s summary line counts the failed items, like the list call's."""
    mapped = opmap(mode=mode, workers=2, retries=0, progress="force")(_flaky)
    assert _summary(lambda: list(mapped.imap(range(20)))).startswith(
        "opmap _flaky: 20 done, 4 failed"
    )


def test_stream_progress_summary_counts_cache_hits_in_thread_mode() -> None:
    """``imap``'s summary line counts cache hits in thread mode, like process mode's."""
    mapped = opmap(mode="thread", workers=2, retries=0, cache=True, progress="force")(_flaky)
    _summary(lambda: mapped(range(20)))
    assert ", 16 cached" in _summary(lambda: list(mapped.imap(range(20))))


SPAWN_SCRIPT = """
import multiprocessing
import traceback
import warnings

from opero import opmap


def parse(text: str) -> int:
    return int(text)  # the line the traceback should print


parse_all = opmap(mode="process", workers=1, retries=0)(parse)

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    warnings.simplefilter("ignore")
    (error,) = parse_all(["x"])
    print("".join(traceback.format_exception(error)))
"""


@pytest.mark.xfail(
    strict=True,
    reason="found writing docs/batch-jobs.md: with spawn/forkserver a script's function goes "
    "by value through cloudpickle, which renames its file '<dynamic-code>': the worker "
    "frame has the line number but not the source line (fork shows it)",
)
def test_spawned_worker_traceback_prints_the_scripts_source_line(tmp_path: Path) -> None:
    """With ``spawn``, a worker's traceback names the script's file and prints the raising line."""
    script = tmp_path / "parse_job.py"
    script.write_text(textwrap.dedent(SPAWN_SCRIPT))
    outcome = run_scenario(
        f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", timeout=120
    )
    assert outcome.returncode == 0, outcome
    assert "ValueError: invalid literal" in outcome.stdout
    assert f'File "{script}", line 10, in parse' in outcome.stdout
    assert "return int(text)  # the line the traceback should print" in outcome.stdout
