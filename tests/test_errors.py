"""The error tree: every error opero raises lives in opero.errors, and each one pickles."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import warnings

import pytest

import opero
import opero.errors
from faultkit import run_scenario

#: Exceptions defined outside opero.errors on purpose: internal signals that never
#: reach a caller (each is caught and turned into a miss or an opero error).
INTERNAL_SIGNALS = {
    # a full Redis connection pool: the cache counts a miss, the limiter raises
    # RateLimitTimeout from it
    "opero._connections.redis.PoolExhausted",
    # a tampered or unsigned cache value: a miss plus a warning, never raised
    "opero.cache._serializers.VerificationError",
}


def _samples() -> list[BaseException]:
    """Return one instance of each error class of opero.errors, with every field set."""
    first, last = ValueError("first"), KeyError("last")
    return [
        opero.errors.OperoError("base"),
        opero.errors.ConfigurationError("retries=-1 must be >= 0"),
        opero.errors.CacheBackendError("Redis at redis://h:1/0 failed"),
        opero.errors.RateLimitTimeout("wait 3 s > rate_max_wait 1 s"),
        opero.errors.AllFailedError("every fallback failed", [first, last]),
        opero.errors.MapError("2 of 5 items failed", [first, last], [1, first, 3, last, 5], [1, 3]),
        opero.errors.WorkerDiedError("worker process 12 died (signal 9)"),
        opero.errors.WorkerStartError("a worker process exited (exit code 1)"),
        opero.errors.OpmapFailureWarning("2 of 5 items failed"),
    ]


def _fields(error: BaseException) -> tuple[object, ...]:
    """Return what identifies ``error``: its type, its args and its extra fields, as reprs."""
    extra: tuple[object, ...] = ()
    if isinstance(error, opero.errors.AllFailedError):
        extra = (error.message, [repr(e) for e in error.errors], repr(error.last))
    if isinstance(error, opero.errors.MapError):
        extra = (
            error.message,
            [repr(e) for e in error.exceptions],
            [repr(v) for v in error.results],
            error.indices,
        )
    return (type(error), repr(error.args), extra)


def _opero_modules() -> list[str]:
    """Return the importable modules of the package (the benchmark harness aside)."""
    names = ["opero"]
    for info in pkgutil.walk_packages(opero.__path__, "opero."):
        if info.name.startswith(("opero._bench", "opero.__main__")):
            continue
        names.append(info.name)
    return names


def test_every_error_class_lives_in_errors_module() -> None:
    """Every exception or warning class of the package is defined in opero.errors or internal."""
    pytest.importorskip("redis")  # opero._ratelimit.redis imports redis-py at import
    elsewhere = set()
    for name in _opero_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException | Warning)
                and value.__module__ == name
                and not attr.startswith("_")
                and name != "opero.errors"
            ):
                elsewhere.add(f"{name}.{value.__qualname__}")
    assert elsewhere == INTERNAL_SIGNALS


def test_public_errors_are_the_errors_module_classes() -> None:
    """opero.X and opero.errors.X are the same class for every error exported by opero."""
    exported = [n for n in opero.__all__ if n in opero.errors.__all__ and n[0].isupper()]
    assert {"MapError", "OpmapFailureWarning", "WorkerDiedError", "WorkerStartError"} <= set(
        exported
    )
    for name in exported:
        cls = getattr(opero, name)
        assert cls is getattr(opero.errors, name)
        assert cls.__module__ == "opero.errors"


@pytest.mark.parametrize("error", _samples(), ids=lambda e: type(e).__name__)
def test_error_pickles_with_its_fields(error: BaseException) -> None:
    """Each error of opero.errors survives a pickle round trip with its type and fields."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning from a custom __reduce__
        data = pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"opero.errors" in data  # pickled by reference to its one home
    assert _fields(pickle.loads(data)) == _fields(error)


def test_errors_unpickle_in_a_fresh_interpreter() -> None:
    """Errors pickled here load in another process that imports nothing of opero first."""
    blob = pickle.dumps(_samples(), protocol=pickle.HIGHEST_PROTOCOL)
    out = run_scenario(
        f"""
        import pickle, sys
        assert "opero" not in sys.modules
        for error in pickle.loads({blob!r}):
            extra = getattr(error, "indices", None)
            print(type(error).__module__, type(error).__name__, error.args[0], extra)
        """,
        timeout=60,
    )
    assert out.returncode == 0, out
    expected = [
        f"opero.errors {type(e).__name__} {e.args[0]} {getattr(e, 'indices', None)}"
        for e in _samples()
    ]
    assert out.lines() == expected
