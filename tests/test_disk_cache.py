"""The disk cache backend: persistence, multi-process writers, TTL, size bound, signing."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import diskcache
import pytest

from opero._opero_core import stable_digest_call
from opero.cache import MISS, CacheBackend, FunctionCache
from opero.cache._disk import DiskBackend
from opero.errors import CacheBackendError, ConfigurationError


def _open(backend: DiskBackend, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "namespace": "opero",
        "qualname": "tests.f",
        "ttl": None,
        "max_size": None,
        "is_async": False,
    }
    options.update(overrides)
    return backend.open(**options)


def _raw(directory: Path, namespace: str = "opero") -> diskcache.Cache:
    return diskcache.Cache(str(directory / f"ns-{namespace}"))


def test_backend_satisfies_the_protocols(tmp_path: Path) -> None:
    """DiskBackend and its function cache implement the documented protocols."""
    backend = DiskBackend(tmp_path)
    assert isinstance(backend, CacheBackend)
    assert backend.stable_keys is True
    assert isinstance(_open(backend), FunctionCache)


def test_open_creates_no_database(tmp_path: Path) -> None:
    """Construction creates the directory only; the database opens at first use."""
    backend = DiskBackend(tmp_path / "new" / "dir")
    _open(backend)
    assert (tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_miss_hit_and_key_format(tmp_path: Path) -> None:
    """A stored value is read back under {namespace}:{qualname}:{digest}, counted in info()."""
    cache = _open(DiskBackend(tmp_path), namespace="ns", qualname="pkg.mod.func")
    digest = stable_digest_call((1,), {"x": "y"})
    assert cache.get(digest) is MISS
    cache.set(digest, {"v": (1, 2)})
    assert cache.get(digest) == {"v": (1, 2)}
    raw = _raw(tmp_path, "ns")
    assert list(raw.iterkeys()) == [f"ns:pkg.mod.func:{digest}"]
    assert pickle.loads(raw[f"ns:pkg.mod.func:{digest}"]) == {"v": (1, 2)}
    assert cache.info()[:2] == (1, 1)


def test_falsy_values_and_delete(tmp_path: Path) -> None:
    """None and other falsy results are hits; delete() reports presence."""
    cache = _open(DiskBackend(tmp_path))
    cache.set("n", None)
    assert cache.get("n") is None
    assert cache.delete("n") is True
    assert cache.delete("n") is False
    assert cache.get("n") is MISS


def test_persists_across_backend_objects_and_processes(tmp_path: Path) -> None:
    """A value written by a subprocess is read by a fresh backend here (a restart)."""
    digest = stable_digest_call(("report", 2024), None)
    script = (
        "import sys\n"
        "from opero.cache._disk import DiskBackend\n"
        "b = DiskBackend(sys.argv[1])\n"
        "c = b.open(namespace='opero', qualname='jobs.report', ttl=3600, max_size=None,"
        " is_async=False)\n"
        f"c.set({digest!r}, {{'rows': 3}})\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    cache = _open(DiskBackend(tmp_path), qualname="jobs.report")
    assert cache.get(digest) == {"rows": 3}


def test_ttl_expires_entries(tmp_path: Path) -> None:
    """An entry carries its expiry time and is a miss once the TTL has passed."""
    backend = DiskBackend(tmp_path)
    cache = _open(backend, ttl=30.0)
    cache.set("k", 1)
    _, expire_time = backend.store("opero").get("opero:tests.f:k", expire_time=True)
    assert 0 < expire_time - time.time() <= 30.0
    short = _open(backend, qualname="tests.short", ttl=0.01)
    short.set("k", 1)
    time.sleep(0.05)
    assert short.get("k") is MISS
    assert cache.get("k") == 1


def test_size_limit_evicts_oldest(tmp_path: Path) -> None:
    """The store stays within size_limit bytes by evicting the oldest stored entries."""
    backend = DiskBackend(tmp_path, size_limit=1_000_000)
    cache = _open(backend)
    blob = b"x" * 40_000
    for i in range(60):
        cache.set(str(i), blob)
        assert backend.store("opero").volume() <= 1_000_000 + 2 * 40_000
    assert cache.get("0") is MISS
    assert cache.get("59") == blob


def _writer(directory: str, worker: int, count: int) -> None:
    """Write ``count`` entries of this worker plus a shared key, all through one backend."""
    cache = _open(DiskBackend(directory))
    for i in range(count):
        cache.set(f"w{worker}-{i}", (worker, i))
        cache.set("shared", worker)


def test_several_processes_write_at_once(tmp_path: Path) -> None:
    """Four processes writing concurrently lose nothing and corrupt nothing."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 150)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        assert proc.exitcode == 0
    cache = _open(DiskBackend(tmp_path))
    for w in range(4):
        for i in range(150):
            assert cache.get(f"w{w}-{i}") == (w, i)
    assert cache.get("shared") in range(4)


def test_threads_share_one_store(tmp_path: Path) -> None:
    """Threads of one process read and write the same store safely."""
    cache = _open(DiskBackend(tmp_path))

    def work(t: int) -> None:
        for i in range(50):
            cache.set(f"{t}-{i}", i)
            assert cache.get(f"{t}-{i}") == i

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.info().hits == 200


def test_clear_is_per_function_and_per_namespace(tmp_path: Path) -> None:
    """clear() drops one function; clear_namespace(ns) one namespace; None every namespace."""
    backend = DiskBackend(tmp_path)
    f = _open(backend, qualname="m.f")
    g = _open(backend, qualname="m.g")
    other = _open(backend, namespace="other")
    f.set("k", 1)
    g.set("k", 2)
    other.set("k", 3)
    f.clear()
    assert (f.get("k"), g.get("k"), other.get("k")) == (MISS, 2, 3)
    backend.clear_namespace("opero")
    assert (g.get("k"), other.get("k")) == (MISS, 3)
    elsewhere = _open(DiskBackend(tmp_path), namespace="made elsewhere/with:chars")
    elsewhere.set("k", 4)
    backend.clear_namespace(None)
    assert (other.get("k"), elsewhere.get("k")) == (MISS, MISS)


def test_async_methods_run_off_the_event_loop(tmp_path: Path) -> None:
    """aget/aset run SQLite and the serializer in a worker thread, not the loop's thread."""
    threads: set[int] = set()

    def dumps(value: Any) -> bytes:
        threads.add(threading.get_ident())
        return pickle.dumps(value)

    def loads(data: bytes) -> Any:
        threads.add(threading.get_ident())
        return pickle.loads(data)

    cache = _open(DiskBackend(tmp_path, serializer=(dumps, loads)), is_async=True)

    async def scenario() -> int:
        await cache.aset("k", 1)
        assert await cache.aget("k") == 1
        assert await cache.adelete("k") is True
        await cache.aclear()
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert threads
    assert loop_thread not in threads


def test_json_and_unserializable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """JSON values round-trip; a value JSON cannot hold is skipped and logged once per type."""
    cache = _open(DiskBackend(tmp_path, serializer="json"))
    cache.set("ok", [1, "a"])
    assert cache.get("ok") == [1, "a"]
    with caplog.at_level(logging.WARNING, logger="opero"):
        cache.set("bad", object())
        cache.set("bad2", object())
    assert cache.get("bad") is MISS
    assert sum("not cached" in r.getMessage() for r in caplog.records) == 1


class _Boom:
    """Unpickling this object creates a marker file (stands in for malicious code)."""

    def __reduce__(self) -> Any:
        return (Path.touch, (Path(os.environ["OPERO_TEST_MARKER"]),))


def test_signed_entries_reject_forgeries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a secret, a forged pickle in the store is a miss + warning and is never unpickled."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("OPERO_TEST_MARKER", str(marker))
    cache = _open(DiskBackend(tmp_path / "c", secret="k"))
    cache.set("good", 1)
    assert cache.get("good") == 1
    raw = _raw(tmp_path / "c")
    raw["opero:tests.f:forged"] = pickle.dumps(_Boom())
    raw["opero:tests.f:foreign"] = 12345
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert cache.get("forged") is MISS
        assert cache.get("foreign") is MISS
    assert not marker.exists()
    assert any("failed verification" in r.getMessage() for r in caplog.records)


def test_corrupt_database_is_a_miss_or_strict_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that cannot be opened is a miss warned once, or CacheBackendError when strict."""
    (tmp_path / "ns-opero").mkdir()
    (tmp_path / "ns-opero" / "cache.db").write_bytes(b"this is not an SQLite database" * 100)
    backend = DiskBackend(tmp_path, retry_interval=0.0)
    cache = _open(backend)
    with caplog.at_level(logging.WARNING, logger="opero"):
        for _ in range(5):
            assert cache.get("k") is MISS
            cache.set("k", 1)
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    strict = _open(DiskBackend(tmp_path, strict=True))
    with pytest.raises(CacheBackendError, match="disk cache"):
        strict.get("k")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"serializer": "marshal"}, "cache_serializer"),
        ({"size_limit": 0}, "size_limit"),
        ({"size_limit": 1.5}, "size_limit"),
        ({"secret": 3}, "cache_secret"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict[str, Any], fragment: str) -> None:
    """Unknown serializers and bad limits raise ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=fragment):
        DiskBackend(tmp_path, **kwargs)


def test_directory_that_cannot_be_created(tmp_path: Path) -> None:
    """A cache_dir under a regular file cannot be created: ConfigurationError naming cache_dir."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigurationError, match="cache_dir"):
        DiskBackend(blocker / "sub")
    with pytest.raises(ConfigurationError, match="cache_dir"):
        DiskBackend(12)  # type: ignore[arg-type]


def test_default_directory_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a directory, OPERO_CACHE_DIR (else XDG_CACHE_HOME/opero) is used."""
    monkeypatch.setenv("OPERO_CACHE_DIR", str(tmp_path / "env"))
    assert DiskBackend().directory == (tmp_path / "env").resolve()
    monkeypatch.delenv("OPERO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert DiskBackend().directory == (tmp_path / "xdg" / "opero").resolve()
