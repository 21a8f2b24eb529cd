"""Hostile pass on the product as a user meets it after the restructure (attack 4).

Each test is an attack that broke the build. Scenarios that start processes run in
their own interpreter with a deadline (tests/faultkit.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import pytest

from faultkit import run_scenario


def _result(source: str, *, timeout: float = 120.0, args: tuple[str, ...] = ()) -> Any:
    """Run a scenario; return the JSON of its last ``RESULT`` line."""
    outcome = run_scenario(source, timeout=timeout, args=args)
    lines = [line[7:] for line in outcome.lines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT (exit {outcome.returncode})\n{outcome.stdout}\n{outcome.stderr}"
    return json.loads(lines[-1])


# A script whose process-mapped functions reach @opero functions of its own __main__.
_MAIN_HELPERS = """
    import json, multiprocessing, sys
    from opero import opmap, opero

    seen = {}

    @opero(retries=3)
    def flaky(x):
        seen[x] = seen.get(x, 0) + 1
        if seen[x] < 2:
            raise ValueError("first call fails")
        return x * 10

    @opero(retries=1)
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    @opero(retries=1)
    async def doubled(x):
        return x * 2

    class Scaler:
        def __init__(self, factor):
            self.factor = factor

        @opero(retries=1)
        def scale(self, x):
            return x * self.factor

    def uses_flaky(x):
        return flaky(x)

    def uses_fib(x):
        return fib(x)

    def uses_method(x):
        return Scaler(3).scale(x)

    async def uses_async(x):
        return await doubled(x)

    def make_local():
        @opero(cache=True)
        def cached(x):
            return x + 1

        @opero(retries=1)
        def retried(x):
            return x + 2

        def uses_both(x):
            return cached(x) + retried(x)

        return uses_both

    if __name__ == "__main__":
        multiprocessing.set_start_method(sys.argv[1], force=True)
        def mapped(fn, mode="process"):
            return opmap(mode=mode, workers=2, progress=False, strict=True)(fn)
        out = {
            "flaky": mapped(uses_flaky)(range(4)),
            "fib": mapped(uses_fib)(range(8)),
            "method": mapped(uses_method)(range(4)),
            "decorated": mapped(flaky)([7]),
            "bound": mapped(Scaler(5).scale)(range(3)),
            "local": mapped(make_local())(range(3)),
        }
        if sys.argv[1] != "forkserver":  # one async_process run is enough
            out["async"] = mapped(uses_async, "async_process")(range(3))
        print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_process_map_of_script_calling_its_opero_helpers(method: str) -> None:
    """A process map of a script's (or a local) function calling @opero functions runs them."""
    result = _result(_MAIN_HELPERS, args=(method,))
    assert result["flaky"] == [0, 10, 20, 30]  # retried in the worker, first call failed
    assert result["fib"] == [0, 1, 1, 2, 3, 5, 8, 13]  # calls itself by its global name
    assert result["method"] == [0, 3, 6, 9]
    assert result["decorated"] == [70]
    assert result["bound"] == [0, 5, 10]
    assert result["local"] == [3, 5, 7]  # local cached and retried helpers
    if method != "forkserver":
        assert result["async"] == [0, 2, 4]


@pytest.mark.parametrize("mode", ["process", "async_process"])
def test_item_error_that_pickles_but_does_not_unpickle_keeps_its_message(mode: str) -> None:
    """An item's exception whose __init__ breaks unpickling reaches the parent with its message."""
    result = _result(
        f"""
        import json, warnings
        warnings.simplefilter("ignore")
        from opero import OperoError, opmap

        class NeedsTwo(Exception):
            def __init__(self, message, code):
                super().__init__(message)
                self.code = code

        @opmap(mode={mode!r}, workers=2, progress=False)
        {"async " if mode == "async_process" else ""}def f(x):
            if x == 1:
                raise NeedsTwo("quota exceeded for tenant 42", 429)
            return x

        if __name__ == "__main__":
            out = f([0, 1, 2])
            error = out[1]
            print("RESULT " + json.dumps([
                out[0], out[2], isinstance(error, OperoError), str(error),
            ]))
        """
    )
    assert result[:3] == [0, 2, True]
    assert "NeedsTwo: quota exceeded for tenant 42" in result[3]
    assert "could not be pickled to the parent process" in result[3]


@pytest.mark.parametrize("bare", ["https://example.com/a", b"payload", bytearray(b"xy")])
def test_map_over_a_bare_string_is_a_clear_type_error(bare: str | bytes) -> None:
    """Calling a map with one str/bytes item raises a TypeError naming the fix, runs nothing."""
    import asyncio

    from opero import opmap

    calls: list[Any] = []

    @opmap(mode="thread", workers=2, progress=False)
    def fetch(url: Any) -> Any:
        calls.append(url)
        return url

    with pytest.raises(TypeError, match=r"fetch\(\) takes an iterable.*pass \[value\]"):
        fetch(bare)
    with pytest.raises(TypeError, match=r"one character at a time"):
        asyncio.run(fetch.amap(bare))
    assert calls == []
    assert fetch([bare]) == [bare]  # the fix the message names works


def test_function_sent_by_value_reaching_something_unpicklable_names_itself_and_the_fix() -> None:
    """A by-value map function reaching a lock fails to pickle with its name and the fix."""
    import pickle
    import threading

    from opero import opmap

    lock = threading.Lock()
    mapped = opmap(mode="process", workers=1, progress=False)(lambda x: (lock, x))
    with pytest.raises(TypeError, match=r"cannot send \S*<lambda> to other processes") as caught:
        pickle.dumps(mapped)
    message = str(caught.value)
    assert "_thread.lock" in message
    assert "importable module" in message


@pytest.mark.parametrize(
    ("method", "mode", "warm"),
    [("spawn", "process", False), ("fork", "process", True), ("spawn", "async_process", False)],
)
def test_set_testing_reaches_worker_processes(method: str, mode: str, warm: bool) -> None:
    """With set_testing() on, process-map workers retry without the backoff sleeps too."""
    result = _result(
        f"""
        import json, multiprocessing
        import opero
        from opero import opmap

        calls = {{}}

        def f(x):
            if x == 0:
                return x  # warms the pool up without a retry
            calls[x] = calls.get(x, 0) + 1
            if calls[x] < 3:
                raise ValueError("fails twice")
            return x

        async def af(x):
            return f(x)

        if __name__ == "__main__":
            multiprocessing.set_start_method({method!r}, force=True)
            mapped = opmap(
                mode={mode!r}, workers=2, progress=False, strict=True,
                retries=3, min_delay=30.0, max_delay=30.0, jitter=False,
            )(af if {mode!r} == "async_process" else f)
            if {warm!r}:
                mapped([0, 0, 0, 0])  # the pool starts (and forks) before the switch
            with opero.set_testing():
                out = mapped([1, 2])
            print("RESULT " + json.dumps(out))
        """,
        timeout=50,  # two real 30 s waits would overrun it
    )
    assert result == [1, 2]


def test_worker_keeps_a_bounded_number_of_functions_sent_by_value() -> None:
    """A worker drops the oldest of many by-value maps (a fresh closure per request) it ran."""
    result = _result(
        """
        import gc, json
        from opero import opmap
        from opero._map.decorator import BY_VALUE_KEPT

        class Payload(list):
            pass

        def alive(_):
            gc.collect()
            return sum(1 for o in gc.get_objects() if type(o).__name__ == "Payload")

        if __name__ == "__main__":
            for n in range(BY_VALUE_KEPT + 40):
                payload = Payload(range(100))  # what a request's closure holds
                mapped = opmap(mode="process", workers=1, progress=False)(
                    lambda x, payload=payload: x + len(payload)
                )
                assert mapped([1]) == [101]
            probe = opmap(mode="process", workers=1, progress=False)(lambda x: alive(x))
            print("RESULT " + json.dumps({"alive": probe([0])[0], "kept": BY_VALUE_KEPT}))
        """
    )
    assert 0 < result["alive"] <= result["kept"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_collected_shared_bucket_closes_its_state_file() -> None:
    """A SharedTokenBucket attached and then collected without close() leaves no file open."""
    import gc

    from opero._ratelimit import SharedTokenBucket

    def open_on(path: str) -> int:
        count = 0
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{name}") == path
        return count

    owner = SharedTokenBucket(rate=1e6, burst=10)
    try:
        for _ in range(30):  # each map's copy in a worker, attached by its first call
            copy = SharedTokenBucket(owner.rate, owner.burst, owner.path)
            assert copy.reserve() == 0.0
            del copy
        gc.collect()
        assert open_on(owner.path) == 0
        owner.reserve()
        assert open_on(owner.path) >= 1  # the count sees an attached bucket
    finally:
        owner.close()
    assert open_on(owner.path) == 0


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_output_in_a_missing_folder_is_refused_before_the_run(flag: str) -> None:
    """``bench --json/--plot`` into a missing folder exits 2 at once, not after the run."""
    import subprocess
    import sys

    name = "/nonexistent-opero-dir/figures" + (".json" if flag == "--json" else ".png")
    proc = subprocess.run(
        [sys.executable, "-m", "opero", "bench", "--only", "core", "--budget-ms", "1", flag, name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{flag}: the folder of" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "core" not in proc.stdout  # nothing ran


def test_async_process_item_that_does_not_pickle_fails_in_its_place() -> None:
    """async_process: an unpicklable item fails alone (it hung the map), a hostile one stops it."""
    result = _result(
        """
        import json, threading, warnings
        warnings.simplefilter("ignore")
        from opero import OperoError, opmap

        lock = threading.Lock()

        class ExitsWhenPickled:
            def __reduce__(self):
                raise SystemExit("from __reduce__")

        async def f(x):
            return x * 2

        async def reaches_lock(x):
            return (x, lock)

        if __name__ == "__main__":
            mapped = opmap(mode="async_process", workers=2, progress=False, chunksize=2)(f)
            out = mapped([1, threading.Lock(), 3, 4])
            try:
                mapped([1, ExitsWhenPickled()])
                hostile = "no error"
            except OperoError as exc:
                hostile = str(exc)
            try:
                opmap(mode="async_process", workers=2, progress=False)(reaches_lock)([1])
                unsendable = "no error"
            except TypeError as exc:
                unsendable = str(exc)
            print("RESULT " + json.dumps({
                "values": [out[0], out[2], out[3]],
                "bad": str(out[1]),
                "hostile": hostile,
                "unsendable": unsendable,
                "after": mapped([5, 6]),
            }))
        """,
        timeout=90,
    )
    assert result["values"] == [2, 6, 8]
    assert "could not be pickled to a worker process" in result["bad"]
    assert "SystemExit" in result["hostile"]
    assert "cannot send reaches_lock to other processes" in result["unsendable"]
    assert result["after"] == [10, 12]  # the background loop and the pool still work
