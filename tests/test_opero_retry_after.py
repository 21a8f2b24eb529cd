"""retry_after: a server's Retry-After (or retry_after attribute) replaces the backoff wait."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import time
from collections.abc import Callable
from typing import Any

import pytest

import opero
from opero import ConfigurationError
from opero import opero as op
from opero._pipeline.retry_after import parse_retry_after, server_wait


class Busy(Exception):
    """An error carrying a server's wait as a ``retry_after`` attribute."""

    def __init__(self, retry_after: Any) -> None:
        super().__init__(f"busy, retry after {retry_after!r}")
        self.retry_after = retry_after


def failing(errors: list[BaseException], value: Any = "ok") -> Callable[..., Any]:
    """Return a function raising ``errors`` in order, then returning ``value``."""
    pending = list(errors)

    def func() -> Any:
        if pending:
            raise pending.pop(0)
        return value

    return func


def test_attribute_wait_replaces_the_backoff_exactly() -> None:
    """A numeric retry_after is the wait, not jittered, even when shorter than the backoff."""
    waits: list[float] = []
    f = op(retries=3, min_delay=5.0, _sleep=waits.append)(failing([Busy(0.25), Busy(2)]))
    assert f() == "ok"
    assert waits == [0.25, 2.0]


def test_timedelta_and_string_attributes_are_read() -> None:
    """A timedelta retry_after and a header-like string are read as seconds."""
    waits: list[float] = []
    errors: list[BaseException] = [Busy(datetime.timedelta(milliseconds=1500)), Busy("3")]
    f = op(retries=3, _sleep=waits.append)(failing(errors))
    assert f() == "ok"
    assert waits == [1.5, 3.0]


def test_no_demand_falls_back_to_the_backoff_schedule() -> None:
    """An error without a demand (or an unreadable one) waits the backoff schedule."""
    waits: list[float] = []
    errors: list[BaseException] = [ConnectionError(), Busy("soon"), Busy(float("nan"))]
    f = op(retries=3, min_delay=0.5, backoff_factor=1.0, jitter=False, _sleep=waits.append)(
        failing(errors)
    )
    assert f() == "ok"
    assert waits == [0.5, 0.5, 0.5]


def test_negative_and_past_waits_are_zero() -> None:
    """A negative number and a date in the past retry at once."""
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    waits: list[float] = []
    f = op(retries=3, _sleep=waits.append)(failing([Busy(-4), Busy(past)]))
    assert f() == "ok"
    assert waits == []  # a zero wait never sleeps


def test_demand_longer_than_max_delay_stops_with_a_note() -> None:
    """A demand past max_delay stops retrying: the error propagates with a note saying why."""
    waits: list[float] = []
    busy = Busy(120)
    f = op(retries=5, max_delay=30.0, _sleep=waits.append)(failing([busy, busy, busy]))
    with pytest.raises(Busy) as info:
        f()
    assert info.value is busy
    assert waits == []
    assert "server asked to wait 120 s, more than max_delay=30 s" in info.value.__notes__[-1]


def test_long_demand_in_a_fallback_chain_raises_all_failed_with_the_reason() -> None:
    """With arg_fallback, a demand past max_delay ends the chain with AllFailedError naming why."""

    @op(retries=3, max_delay=1.0, arg_fallback="hosts", _sleep=lambda s: None)
    def fetch(hosts: tuple[str, ...] = ("a", "b")) -> str:
        raise Busy(60)

    with pytest.raises(opero.AllFailedError, match="server asked to wait 60 s") as info:
        fetch()
    assert len(info.value.errors) == 2


def test_retry_after_false_ignores_the_demand() -> None:
    """retry_after=False waits the backoff even when the error asks for more."""
    waits: list[float] = []
    f = op(
        retries=1,
        retry_after=False,
        min_delay=0.1,
        jitter=False,
        _sleep=waits.append,
    )(failing([Busy(9)]))
    assert f() == "ok"
    assert waits == [0.1]


def test_callable_replaces_detection_and_none_means_backoff() -> None:
    """A callable retry_after decides the wait; None from it means the backoff schedule."""
    waits: list[float] = []
    seen: list[BaseException] = []

    def decide(exc: BaseException) -> float | None:
        seen.append(exc)
        return 0.7 if isinstance(exc, KeyError) else None

    errors: list[BaseException] = [KeyError("k"), Busy(5)]
    f = op(
        retries=2,
        retry_after=decide,
        min_delay=0.2,
        jitter=False,
        backoff_factor=1.0,
        _sleep=waits.append,
    )(failing(errors))
    assert f() == "ok"
    assert waits == [0.7, 0.2]  # Busy's own attribute is not read: the callable decides
    assert [type(e) for e in seen] == [KeyError, Busy]


@pytest.mark.parametrize("bad", [-1, float("inf"), "soon", True])
def test_callable_returning_a_bad_value_is_a_configuration_error(bad: Any) -> None:
    """A callable retry_after returning a non-wait raises ConfigurationError naming it."""
    f = op(retries=2, retry_after=lambda exc: bad, _sleep=lambda s: None)(failing([Busy(1)]))
    with pytest.raises(ConfigurationError, match="retry_after of"):
        f()


@pytest.mark.parametrize("value", [1, "yes", lambda: 1.0])
def test_bad_option_values_are_refused_at_decoration(value: Any) -> None:
    """retry_after must be a bool or a one-argument callable, refused at decoration."""
    with pytest.raises(ConfigurationError, match="retry_after"):
        op(retry_after=value)


def test_testing_switch_makes_the_server_wait_zero() -> None:
    """Under set_testing a server's wait is zero, and a demand past max_delay still stops."""
    waits: list[float] = []
    with opero.set_testing():
        f = op(retries=3, _sleep=waits.append)(failing([Busy(3)]))
        assert f() == "ok"
        g = op(retries=3, max_delay=1.0, _sleep=waits.append)(failing([Busy(3)]))
        with pytest.raises(Busy):
            g()
    assert waits == []


def test_async_honours_the_demand() -> None:
    """An async function waits the server's demand through asyncio sleep."""
    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    errors = [Busy(0.4)]

    @op(retries=2, _asleep=asleep)
    async def call() -> str:
        if errors:
            raise errors.pop()
        return "ok"

    assert asyncio.run(call()) == "ok"
    assert waits == [0.4]


# --- detection --------------------------------------------------------------------------


def test_parse_delta_seconds_and_http_dates() -> None:
    """Delta-seconds, bytes, and an HTTP-date relative to the wall clock are parsed."""
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(b" 7 ") == 7.0
    assert parse_retry_after("1.5") == 1.5
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=lambda: now) == pytest.approx(30.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past


@pytest.mark.parametrize("value", ["", "soon", "-5", "1e3", "9" * 100, None, 12])
def test_parse_refuses_what_is_not_a_header_wait(value: Any) -> None:
    """Unreadable, overlong or non-string header values are no demand."""
    assert parse_retry_after(value) is None


def test_huge_values_are_capped_not_overflowing() -> None:
    """A huge attribute or header is capped at 1e9 s instead of overflowing."""
    assert server_wait(Busy(10**400)) == 1e9
    assert server_wait(Busy("9" * 40)) == 1e9


def test_hostile_attributes_are_no_demand() -> None:
    """An exception whose attribute access raises gives no demand, and the call retries normally."""

    class Hostile(Exception):
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("no attributes here")

        @property
        def retry_after(self) -> Any:
            raise RuntimeError("boom")

    assert server_wait(Hostile()) is None
    waits: list[float] = []
    f = op(retries=1, min_delay=0.3, jitter=False, _sleep=waits.append)(failing([Hostile()]))
    assert f() == "ok"
    assert waits == [0.3]


def test_plain_dict_headers_on_a_response_attribute() -> None:
    """A response with a plain dict of headers is read whatever the header's case."""

    class Response:
        def __init__(self) -> None:
            self.headers = {"retry-after": "4"}

    class HTTPError(Exception):
        response = Response()

    assert server_wait(HTTPError()) == 4.0


def test_httpx_status_error() -> None:
    """httpx.HTTPStatusError's response Retry-After is read."""
    httpx = pytest.importorskip("httpx")
    request = httpx.Request("GET", "https://api.test/")
    response = httpx.Response(429, headers={"Retry-After": "2"}, request=request)
    with pytest.raises(httpx.HTTPStatusError) as info:
        response.raise_for_status()
    assert server_wait(info.value) == 2.0


def test_requests_http_error() -> None:
    """requests.HTTPError's response Retry-After (an HTTP-date too) is read."""
    requests = pytest.importorskip("requests")
    response = requests.models.Response()
    response.status_code = 503
    when = email.utils.formatdate(time.time() + 60, usegmt=True)
    response.headers["Retry-After"] = when
    with pytest.raises(requests.HTTPError) as info:
        response.raise_for_status()
    wait = server_wait(info.value)
    assert wait is not None
    assert 55 < wait <= 60
    assert server_wait(requests.HTTPError("no response")) is None


def test_aiohttp_client_response_error() -> None:
    """aiohttp.ClientResponseError's headers Retry-After is read (and None headers is no demand)."""
    aiohttp = pytest.importorskip("aiohttp")
    from multidict import CIMultiDict, CIMultiDictProxy

    headers = CIMultiDictProxy(CIMultiDict({"retry-after": "3"}))
    exc = aiohttp.ClientResponseError(None, (), status=429, headers=headers)  # type: ignore[arg-type]
    assert server_wait(exc) == 3.0
    assert server_wait(aiohttp.ClientResponseError(None, (), status=500)) is None  # type: ignore[arg-type]


def test_urllib_http_error() -> None:
    """urllib.error.HTTPError's headers Retry-After is read."""
    import email.message
    import urllib.error

    headers = email.message.Message()
    headers["Retry-After"] = "6"
    exc = urllib.error.HTTPError("https://api.test/", 503, "busy", headers, None)
    assert server_wait(exc) == 6.0
