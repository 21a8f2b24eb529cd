"""Tests of ``python -m opero bench``: the CLI, the table, the JSON document and the plot.

The benchmark runs in a subprocess with a tiny budget (``--quick --budget-ms 2
--repeat 1``) so it takes seconds; nothing here asserts a speed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REDIS_SERVER
from faultkit import run_scenario
from opero._bench import BenchOptions, run_bench
from opero._bench._harness import (
    Case,
    Group,
    Impl,
    LoopFn,
    Settings,
    call_loop,
    check,
    run_group,
)

TINY = ["--quick", "--budget-ms", "2", "--repeat", "1"]
DEFAULT_GROUPS = ["core", "cache_hit", "cache_miss", "retry", "ratelimit", "map"]
TITLES = {
    "core": "native core",
    "cache_hit": "cache hit",
    "cache_miss": "cache miss",
    "retry": "retry, success path",
    "ratelimit": "rate-limit acquire",
    "map": "parallel map",
}
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?[kM]?")


def run_cli(
    *args: str, prelude: str = "", timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m opero`` (after ``prelude``, if any) and return the finished process."""
    code = f"{prelude}\nimport sys\nfrom opero.__main__ import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every default group once with a tiny budget, writing JSON and (if possible) a plot."""
    out = tmp_path_factory.mktemp("bench")
    args = [*TINY, "--json", str(out / "bench.json")]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        args += ["--plot", str(out / "bench.png")]
    proc = run_cli("bench", *args)
    return {"proc": proc, "dir": out, "has_mpl": has_mpl}


def test_help_lists_the_bench_command() -> None:
    """``python -m opero --help`` names the bench command and ``bench --help`` its options."""
    top = subprocess.run(
        [sys.executable, "-m", "opero", "--help"], capture_output=True, text=True, check=False
    )
    assert top.returncode == 0
    assert "bench" in top.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "opero", "bench", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert sub.returncode == 0
    for option in ("--quick", "--json", "--plot", "--only", "--budget-ms"):
        assert option in sub.stdout
    assert 'pip install "opero[bench]"' in sub.stdout


def test_unknown_group_is_a_usage_error_listing_the_groups() -> None:
    """``--only nosuch`` exits 2 and lists the valid group names."""
    proc = run_cli("bench", "--only", "nosuch", *TINY)
    assert proc.returncode == 2
    assert "unknown group nosuch" in proc.stderr
    for name in DEFAULT_GROUPS:
        assert name in proc.stderr


def test_plot_needs_a_png_name() -> None:
    """``--plot chart.svg`` is refused before anything runs, naming the option."""
    proc = run_cli("bench", "--only", "core", "--plot", "chart.svg", *TINY)
    assert proc.returncode == 2
    assert "--plot" in proc.stderr


def test_default_run_exits_zero(full_run: dict[str, Any]) -> None:
    """A tiny default run finishes with exit status 0 (no opero piece failed)."""
    proc = full_run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_table_has_every_group_with_numbers(full_run: dict[str, Any]) -> None:
    """Every default group prints its header and at least one row holding a figure."""
    out: str = full_run["proc"].stdout
    assert "ratio = opero's time / the anchor's time" in out
    sections = re.split(r"\n== ", out)
    for name in DEFAULT_GROUPS:
        section = next((s for s in sections if s.startswith(TITLES[name])), None)
        assert section is not None, f"group {name} missing from the table"
        rows = [line for line in section.splitlines()[3:] if line and not line.startswith(" ")]
        assert rows, f"group {name} has no rows"
        assert any(NUMBER.search(line[27:]) for line in rows), f"group {name} has no figures"


def test_async_cache_hit_is_timed_against_its_anchors(full_run: dict[str, Any]) -> None:
    """The cache_hit group times an ``async def`` hit against a plain async wrapper."""
    out: str = full_run["proc"].stdout
    line = next(x for x in out.splitlines() if x.startswith("hit, await f(1)"))
    assert re.search(r"plain async wrapper\s+\S+\s+\d+\.\d+x", line), line


def test_table_fits_100_columns(full_run: dict[str, Any]) -> None:
    """No line of the report is wider than 100 columns."""
    out: str = full_run["proc"].stdout
    assert max(len(line) for line in out.splitlines()) <= 100


def test_json_holds_figures_and_ratios(full_run: dict[str, Any]) -> None:
    """``--json`` writes a document with every group, opero's figures, anchors and ratios."""
    doc = json.loads((full_run["dir"] / "bench.json").read_text())
    assert doc["exit_status"] == 0
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["method"]["subtracted"] == "nothing"
    assert doc["anchor_versions"]["cachetools"]
    assert [g["name"] for g in doc["groups"]] == DEFAULT_GROUPS
    ratios = [
        a["ratio"]
        for g in doc["groups"]
        for r in g["rows"]
        for a in r["anchors"]
        if a["ratio"] is not None
    ]
    assert ratios, "no ratio in the JSON document"
    assert all(r > 0 for r in ratios)
    core = doc["groups"][0]["rows"][0]
    assert core["opero"]["best_ns"] > 0
    lru = next(a for a in core["anchors"] if a["status"] == "ok")
    assert lru["ratio"] == pytest.approx(core["opero"]["best_ns"] / lru["timing"]["best_ns"])


def test_plot_is_a_png(full_run: dict[str, Any]) -> None:
    """``--plot`` writes a PNG image when matplotlib is installed."""
    if not full_run["has_mpl"]:
        pytest.skip("matplotlib is not installed")
    data = (full_run["dir"] / "bench.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_missing_anchor_says_how_to_install() -> None:
    """An anchor that cannot be imported shows as "not installed" with the pip command."""
    proc = run_cli(
        "bench",
        "--only",
        "core",
        *TINY,
        prelude="import sys; sys.modules['cachebox'] = None; sys.modules['moka_py'] = None",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"cachebox\.LRUCache\[k\]\s+not installed", proc.stdout)
    assert "anchors not installed: cachebox (cachebox), moka_py (moka-py)" in proc.stdout
    assert 'pip install "opero[bench]"' in proc.stdout


def test_call_loop_runs_the_statement_n_times() -> None:
    """A generated loop performs its statement exactly ``n`` times."""
    calls: list[int] = []
    call_loop("f(1)", {"f": calls.append})(7)
    assert calls == [1] * 7


def _broken(stack: contextlib.ExitStack) -> LoopFn:
    check(False, "cache never hit")
    raise AssertionError("unreachable")


def _fine(stack: contextlib.ExitStack) -> LoopFn:
    return call_loop("pass", {})


BROKEN = Group(
    "broken",
    "a broken piece",
    "ns/op",
    lambda settings: [Case("op", Impl("opero", _broken), [Impl("anchor", _fine)])],
)


def test_a_wrong_answer_fails_the_group_but_the_anchors_still_run() -> None:
    """An opero piece that fails its check marks the group failed; its anchors are still timed."""
    result = run_group(BROKEN, Settings(target_ns=1_000_000, repeat=1))
    assert result.failed
    row = result.rows[0]
    assert row.status == "error"
    assert "cache never hit" in (row.error or "")
    assert row.anchors[0].status == "ok"


def test_a_failed_piece_makes_the_exit_status_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_bench prints the failure, carries on, and returns exit status 1."""
    import opero._bench as bench

    monkeypatch.setattr(bench, "all_groups", lambda: [BROKEN])
    status = run_bench(BenchOptions(Settings(target_ns=1_000_000, repeat=1)))
    out = capsys.readouterr().out
    assert status == 1
    assert "opero FAILED: CheckError: cache never hit" in out
    assert "FAILED groups" in out


@pytest.mark.redis
def test_opt_in_backend_groups_run() -> None:
    """``--only redis,disk`` starts a private redis-server, times both backends and the limiter."""
    if shutil.which("redis-server") is None and not os.path.exists("/usr/bin/redis-server"):
        if os.environ.get("OPERO_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed; OPERO_REQUIRE_REDIS=1 makes this an error")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    proc = run_cli("bench", "--only", "redis,disk", *TINY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for operation in ("redis hit, sync", "redis hit, async", "redis rate limit, sync", "disk hit"):
        line = next(x for x in proc.stdout.splitlines() if x.startswith(operation))
        assert re.search(r"\d\.\d\dx", line), line


CTRL_C_SCENARIO = """
import os, signal, subprocess, sys, time

def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == str(pid) and fields[0] != "Z":
                found.append(int(entry))
    return found

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

code = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\\n"
    "from opero.__main__ import main\\n"
    "sys.exit(main(['bench', '--only', 'redis', '--budget-ms', '300']))"
)
bench = subprocess.Popen(
    [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
)
servers = []
while not servers and bench.poll() is None:
    servers = children(bench.pid)
    time.sleep(0.05)
time.sleep(0.5)
bench.send_signal(signal.SIGINT)
out, err = bench.communicate(timeout=60)
time.sleep(0.5)
print("servers", len(servers))
print("exit", bench.returncode)
print("alive", sum(1 for pid in servers if alive(pid)))
print("traceback", "Traceback" in err)
print("last", err.strip().splitlines()[-1] if err.strip() else "")
"""


@pytest.mark.redis
def test_ctrl_c_stops_the_bench_and_its_redis_server() -> None:
    """Ctrl-C during the redis group exits 130 with one line, and its redis-server is stopped."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    outcome = run_scenario(CTRL_C_SCENARIO, timeout=120)
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    assert outcome.lines() == [
        "servers 1",
        "exit 130",
        "alive 0",
        "traceback False",
        "last interrupted",
    ], outcome.stdout


def test_redis_group_without_a_server_binary_is_not_available() -> None:
    """Without ``redis-server`` the redis group's rows say "not available" and the run passes."""
    proc = run_cli(
        "bench",
        "--only",
        "redis",
        *TINY,
        prelude="import opero._bench._backends as b; b.find_redis_server = lambda: None",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [x for x in proc.stdout.splitlines() if x.startswith("redis ")]
    from opero._bench._backends import _build_redis
    from opero._bench._harness import Settings

    assert len(rows) == len(_build_redis(Settings()))  # one row per case of the group
    assert all(row.endswith("n/a") and "error" not in row for row in rows), rows
    assert "not available: Unavailable: redis-server is not installed" in proc.stdout
    assert "apt-get install redis-server" in proc.stdout


@pytest.mark.dask
@pytest.mark.slow
def test_opt_in_dask_group_runs() -> None:
    """``--only dask`` starts a LocalCluster and times @opmap against client.map per item."""
    pytest.importorskip("distributed")
    proc = run_cli("bench", "--only", "dask", *TINY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"dask, 2k trivial .*client\.map per item .*\dx", proc.stdout)


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    """``--plot`` without matplotlib prints the pip command and exits 1, writing no file."""
    target = tmp_path / "chart.png"
    proc = run_cli(
        "bench",
        "--only",
        "core",
        "--plot",
        str(target),
        *TINY,
        prelude="import sys; sys.modules['matplotlib'] = None",
    )
    assert proc.returncode == 1
    assert '--plot needs matplotlib: pip install "opero[plot]"' in proc.stdout
    assert not target.exists()
