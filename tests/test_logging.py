"""The opero logger behaves as a library's: silent unless configured, structured when it speaks."""

from __future__ import annotations

import logging
import os

import pytest

from faultkit import ROOT, run_scenario
from opero import opero


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    python = str(ROOT / "python")
    return {"PYTHONPATH": python + (os.pathsep + path if path else "")}


def test_unconfigured_application_prints_nothing() -> None:
    """Without logging configured, failing, retried and fallback calls print nothing to stderr."""
    outcome = run_scenario(
        """
        from opero import opero

        @opero(retries=2, min_delay=0)
        def down():
            raise ConnectionError("down")

        @opero(retries=0, arg_fallback="hosts")
        def pick(hosts):
            raise ConnectionError(hosts[0])

        @opero(retries=0, on_failure=lambda exc: 1 / 0)
        def bad_callback():
            raise ValueError("x")

        for func, args in ((down, ()), (pick, (["a", "b"],)), (bad_callback, ())):
            try:
                func(*args)
            except Exception as exc:
                print(type(exc).__name__)
        """,
        timeout=60,
        env=_env(),
    )
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines() == ["ConnectionError", "AllFailedError", "ValueError"]
    assert outcome.stderr == ""


def test_configured_application_sees_records() -> None:
    """With basicConfig(level=INFO), retries and the exhaustion print with their fields."""
    outcome = run_scenario(
        """
        import logging
        logging.basicConfig(
            level=logging.INFO,
            format="%(levelname)s %(opero_event)s %(opero_function)s %(message)s",
        )
        from opero import opero

        @opero(retries=1, min_delay=0)
        def down():
            raise ConnectionError("down")

        try:
            down()
        except ConnectionError:
            pass
        """,
        timeout=60,
        env=_env(),
    )
    assert outcome.returncode == 0, outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("INFO retry __main__.down opero: __main__.down failed with")
    assert lines[1].startswith("INFO exhausted __main__.down opero: __main__.down failed on all 2")


def test_records_carry_structured_fields(caplog: pytest.LogCaptureFixture) -> None:
    """Retry records carry opero_function, opero_attempt, opero_wait and opero_error_type."""

    def flaky(state: dict[str, int] = {"n": 0}) -> int:  # noqa: B006
        state["n"] += 1
        if state["n"] < 3:
            raise TimeoutError("slow")
        return 1

    f = opero(retries=3, backoff_function=lambda attempt: 0.0)(flaky)
    with caplog.at_level(logging.DEBUG, logger="opero"):
        assert f() == 1
    retries = [r for r in caplog.records if getattr(r, "opero_event", None) == "retry"]
    assert [r.opero_attempt for r in retries] == [1, 2]  # type: ignore[attr-defined]
    for record in retries:
        assert record.levelno == logging.INFO
        assert record.opero_function.endswith("flaky")  # type: ignore[attr-defined]
        assert record.opero_wait == 0.0  # type: ignore[attr-defined]
        assert record.opero_error_type == "TimeoutError"  # type: ignore[attr-defined]
        assert "retry" in record.getMessage()


def test_fallback_and_rate_limit_records(caplog: pytest.LogCaptureFixture) -> None:
    """A failed candidate is an INFO fallback record; a token wait a DEBUG rate_limit_wait one."""

    @opero(retries=0, arg_fallback="hosts")
    def pick(hosts: list[str]) -> str:
        if hosts[0] == "a":
            raise ConnectionError("a down")
        return hosts[0]

    @opero(retries=0, rate_limit=5.0, _sleep=lambda s: None)
    def limited() -> int:
        return 1

    with caplog.at_level(logging.DEBUG, logger="opero"):
        assert pick(["a", "b"]) == "b"
        limited()
        limited()
    events = {getattr(r, "opero_event", None): r for r in caplog.records}
    assert events["fallback"].levelno == logging.INFO
    assert events["fallback"].opero_error_type == "ConnectionError"  # type: ignore[attr-defined]
    assert events["rate_limit_wait"].levelno == logging.DEBUG
    assert events["rate_limit_wait"].opero_wait > 0  # type: ignore[attr-defined]


def test_null_handler_installed() -> None:
    """Importing opero puts a NullHandler on the opero logger (a library never prints by itself)."""
    handlers = logging.getLogger("opero").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
