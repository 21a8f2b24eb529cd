"""``@opero`` around real httpx clients, against the real demo service of ``tests/httpserver.py``.

The server counts and timestamps every request it receives, so these tests
check what reached the wire: how many attempts, and how long the client waited
between them. Real waits are used only where a wait is what is tested (about
one second each); elsewhere the retry delays are zero or the private ``_sleep``
option records the waits instead of sleeping.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import opero
from faultkit import run_scenario
from httpserver import DemoServer
from opero import opero as op
from test_docs_examples import extract_blocks

httpx = pytest.importorskip("httpx")

NO_WAIT: dict[str, Any] = {"min_delay": 0.0, "max_delay": 0.0, "jitter": False}
"""Retry options for tests that count attempts and do not test waits."""


class _Waits:
    """A ``_sleep`` that records each wait instead of sleeping (and stops a runaway loop).

    Not a list: an empty list is falsy, and opero's ``_sleep or time.sleep`` would
    then sleep for real.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, seconds: float) -> None:
        if len(self.seconds) >= 50:
            raise RuntimeError(f"more than 50 waits requested: {self.seconds[:5]}...")
        self.seconds.append(seconds)

    def positive(self) -> list[float]:
        """Return the waits that would have slept (> 0 s)."""
        return [w for w in self.seconds if w > 0]


def _retryable(exc: BaseException) -> bool:
    """Retry connection errors, 429 and 5xx answers; not other 4xx."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status == 429 or status >= 500
    return isinstance(exc, httpx.TransportError)


def _getter(client: Any, **options: Any) -> Callable[..., Any]:
    """Return an ``@opero`` function that GETs a URL with ``client`` and returns its JSON."""

    @op(**{"retry_on": httpx.HTTPError, "retry_predicate": _retryable, **options})
    def get(url: str, **params: Any) -> Any:
        response = client.get(url, params=params)
        response.raise_for_status()
        return response.json()

    return get


def _agetter(client: Any, **options: Any) -> Callable[..., Any]:
    """Async twin of :func:`_getter`."""

    @op(**{"retry_on": httpx.HTTPError, "retry_predicate": _retryable, **options})
    async def get(url: str, **params: Any) -> Any:
        response = await client.get(url, params=params)
        response.raise_for_status()
        return response.json()

    return get


# --- the server itself -------------------------------------------------------------------


def test_server_scripts_each_path(http_server: str, http_service: DemoServer) -> None:
    """The demo service answers as scripted, with counters kept per path and id."""
    with httpx.Client(base_url=http_server) as client:
        codes = [client.get("/flaky", params={"id": "a", "fail": 2}).status_code for _ in range(3)]
        assert codes == [503, 503, 200]
        assert client.get("/flaky", params={"id": "b", "fail": 2}).status_code == 503
        limited = client.get("/limited", params={"id": "c"})
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "1")
        assert client.get("/limited", params={"id": "c"}).status_code == 200
        dated = client.get("/limited", params={"id": "d", "format": "date"})
        assert dated.headers["Retry-After"].endswith(" GMT")
        assert client.get("/json/7").json() == {"id": "7", "name": "item 7"}
        assert [client.get("/job/j", params={"pending": 1}).json()["status"] for _ in "ab"] == [
            "pending",
            "done",
        ]
        assert client.get("/status/418").status_code == 418
        assert client.get("/nowhere").status_code == 404
        assert client.get("/slow", params={"delay": 99}).status_code == 400
        log = client.get("/log", params={"id": "a"}).json()
    assert log == [r.arrival for r in http_service.requests("/flaky", "a")]
    assert [r.status for r in http_service.requests("/flaky", "a")] == [503, 503, 200]
    assert http_service.count("/flaky") == 4
    assert http_service.count(id="a") == 3
    assert all(gap >= 0 for gap in http_service.gaps("/flaky", "a"))


def test_server_records_a_request_on_arrival(http_server: str, http_service: DemoServer) -> None:
    """A request still being answered is already recorded, its status not yet known."""
    with (
        httpx.Client(base_url=http_server, timeout=0.2) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.get("/slow", params={"delay": 2, "id": "early"})
    (request,) = http_service.requests("/slow", "early")
    assert request.status is None
    assert request.host == "127.0.0.1"


def test_server_reset_forgets_counters(http_server: str, http_service: DemoServer) -> None:
    """After ``reset()`` the counters start again and the log is empty."""
    assert httpx.get(f"{http_server}/flaky?id=r&fail=1").status_code == 503
    http_service.reset()
    assert http_service.count() == 0
    assert httpx.get(f"{http_server}/flaky?id=r&fail=1").status_code == 503


def test_server_stops_while_a_slow_request_sleeps() -> None:
    """``stop()`` returns promptly even while a ``/slow`` request is sleeping."""
    server = DemoServer()
    with httpx.Client(timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
        client.get(f"{server.url}/slow", params={"delay": 20})
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/json/1", timeout=1)


# --- retries that run today ------------------------------------------------------------------


def test_sync_client_retries_503_until_success(http_server: str, http_service: DemoServer) -> None:
    """A sync httpx client retries two 503s and returns the third answer."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=3, **NO_WAIT)
        assert get("/flaky", id="s", fail=2) == {"id": "s", "attempt": 3}
    assert http_service.count("/flaky", "s") == 3


def test_async_client_retries_503_until_success(http_server: str, http_service: DemoServer) -> None:
    """An async httpx client retries two 503s and returns the third answer."""

    async def main() -> Any:
        async with httpx.AsyncClient(base_url=http_server) as client:
            return await _agetter(client, retries=3, **NO_WAIT)("/flaky", id="as", fail=2)

    assert asyncio.run(main()) == {"id": "as", "attempt": 3}
    assert http_service.count("/flaky", "as") == 3


def test_concurrent_async_calls_keep_their_own_counters(
    http_server: str, http_service: DemoServer
) -> None:
    """Twenty concurrent async calls, each failing once, each succeed on their own second try."""

    async def main() -> list[Any]:
        async with httpx.AsyncClient(base_url=http_server) as client:
            get = _agetter(client, retries=2, **NO_WAIT)
            return await asyncio.gather(*(get("/flaky", id=f"c{i}", fail=1) for i in range(20)))

    answers = asyncio.run(main())
    assert answers == [{"id": f"c{i}", "attempt": 2} for i in range(20)]
    assert [http_service.count("/flaky", f"c{i}") for i in range(20)] == [2] * 20


def test_4xx_is_not_retried(http_server: str, http_service: DemoServer) -> None:
    """``retry_predicate`` keeps a 404 from being retried: one request, its error propagates."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=3, **NO_WAIT)
        with pytest.raises(httpx.HTTPStatusError) as info:
            get("/status/404", id="nf")
    assert info.value.response.status_code == 404
    assert http_service.count("/status/404", "nf") == 1


def test_exhausted_retries_raise_the_last_http_error(
    http_server: str, http_service: DemoServer
) -> None:
    """When retries run out the last ``httpx.HTTPStatusError`` propagates, every attempt made."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=2, **NO_WAIT)
        with pytest.raises(httpx.HTTPStatusError) as info:
            get("/status/503", id="ex")
    assert info.value.response.status_code == 503
    assert len(opero.attempt_errors(info.value)) == 3
    assert http_service.count("/status/503", "ex") == 3


def test_connect_error_is_retried(http_server: str, http_service: DemoServer) -> None:
    """A refused connection is retried like a 5xx, and its ``httpx.ConnectError`` propagates."""
    dead = DemoServer()
    url = dead.url
    dead.stop()
    with httpx.Client() as client:
        get = _getter(client, retries=2, **NO_WAIT)
        with pytest.raises(httpx.ConnectError) as info:
            get(f"{url}/json/1")
    assert len(opero.attempt_errors(info.value)) == 3


def test_cached_get_reaches_the_server_once(http_server: str, http_service: DemoServer) -> None:
    """With ``cache=True`` a repeated GET is answered from the cache, not the server."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, cache=True, cache_ttl=60, retries=0)
        first = get("/json/42")
        assert get("/json/42") == first == {"id": "42", "name": "item 42"}
        get("/json/43")
    assert http_service.count("/json/42") == 1
    assert http_service.count("/json/43") == 1
    assert get.cache_info().hits == 1


def test_cached_get_from_eight_threads_reaches_the_server_once(
    http_server: str, http_service: DemoServer
) -> None:
    """Eight threads missing the cache at once make one request (single flight), same answer."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, cache=True, retries=0)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: get("/slow", delay=0.3, id="t"), range(8)))
    assert answers == [{"id": "t", "slept": 0.3}] * 8
    assert http_service.count("/slow", "t") == 1


def test_cached_async_get_reaches_the_server_once(
    http_server: str, http_service: DemoServer
) -> None:
    """Concurrent async GETs of one URL reach the server once (cache plus single flight)."""

    async def main() -> list[Any]:
        async with httpx.AsyncClient(base_url=http_server) as client:
            get = _agetter(client, cache=True, retries=0)
            return await asyncio.gather(*(get("/slow", delay=0.2, id="c") for _ in range(5)))

    answers = asyncio.run(main())
    assert answers == [{"id": "c", "slept": 0.2}] * 5
    assert http_service.count("/slow", "c") == 1


# --- issue 12: the new options ------------------------------------------------------------


def test_retry_after_seconds_is_honoured(http_server: str, http_service: DemoServer) -> None:
    """A 429 with ``Retry-After: 1`` makes the next attempt arrive at least 1 s later."""
    with httpx.Client(base_url=http_server) as client:
        # The backoff alone would retry after 10 ms; the server asks for 1 s.
        get = _getter(client, retries=2, min_delay=0.01, max_delay=5, jitter=False)
        assert get("/limited", id="ra") == {"id": "ra", "attempt": 2}
    (gap,) = http_service.gaps("/limited", "ra")
    assert gap >= 1.0


def test_retry_after_http_date_is_honoured(http_server: str, http_service: DemoServer) -> None:
    """A ``Retry-After`` HTTP date one second ahead delays the next attempt by about 1 s."""

    async def main() -> Any:
        async with httpx.AsyncClient(base_url=http_server) as client:
            get = _agetter(client, retries=2, min_delay=0.01, max_delay=5, jitter=False)
            return await get("/limited", id="rd", format="date")

    assert asyncio.run(main()) == {"id": "rd", "attempt": 2}
    (gap,) = http_service.gaps("/limited", "rd")
    # The date has whole seconds and is rounded up, so the wait is in [1, 2] s, less the
    # few milliseconds between the server's clock reading and the client's.
    assert gap >= 0.95


@pytest.mark.parametrize(
    "header",
    ["", "soon", "-5", "nan", "inf", "Thu, 01 Jan 1970 00:00:00 GMT", "Mon, 32 Foo 2020 99:99 GMT"],
)
def test_malformed_or_past_retry_after_uses_the_backoff(
    header: str, http_server: str, http_service: DemoServer
) -> None:
    """A malformed, negative, non-finite or past ``Retry-After`` falls back to the backoff."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=1, min_delay=0.01, max_delay=3, jitter=False)
        assert get("/limited", id="bad", header=header)["attempt"] == 2
    (gap,) = http_service.gaps("/limited", "bad")
    assert gap < 0.9


@pytest.mark.parametrize("header", ["Wed, 21 Oct 9999 07:28:00 GMT", "99999999999999999999999"])
def test_absurd_retry_after_stops_at_once(
    header: str, http_server: str, http_service: DemoServer
) -> None:
    """A ``Retry-After`` far past ``max_delay`` (a year 9999 date, 10**23 s) stops the retries."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=3, min_delay=0.01, max_delay=3, jitter=False)
        with pytest.raises(httpx.HTTPStatusError) as info:
            get("/limited", id="absurd", header=header)
    assert info.value.response.status_code == 429
    assert http_service.count("/limited", "absurd") == 1


_INTERRUPTED_WAIT = """
import asyncio, os, signal, sys, threading, time
sys.path.insert(0, "tests")
import httpx
from httpserver import DemoServer
from opero import opero

server = DemoServer()
params = {"id": "int", "retry_after": 30}
options = dict(retries=3, retry_on=httpx.HTTPStatusError, max_delay=60)

@opero(**options)
def get():
    with httpx.Client(base_url=server.url, timeout=5) as client:
        response = client.get("/limited", params=params)
    response.raise_for_status()

@opero(**options)
async def aget():
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        response = await client.get("/limited", params=params)
    response.raise_for_status()

call = (lambda: asyncio.run(aget())) if sys.argv[1] == "async" else get
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
started = time.monotonic()
try:
    call()
except KeyboardInterrupt:
    print("interrupted after", round(time.monotonic() - started, 1))
print("requests", server.count())
server.stop()
"""


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_ctrl_c_ends_a_retry_after_wait(kind: str) -> None:
    """Ctrl-C during a server-requested 30 s wait propagates at once; no retry is sent."""
    outcome = run_scenario(_INTERRUPTED_WAIT, timeout=30, args=(kind,))
    assert outcome.returncode == 0, outcome.stderr
    interrupted, requests = outcome.lines()
    assert interrupted.startswith("interrupted after")
    assert float(interrupted.split()[-1]) < 10
    assert requests == "requests 1"


def test_retry_after_off_uses_the_backoff(http_server: str, http_service: DemoServer) -> None:
    """With ``retry_after=False`` the 10 ms backoff decides, not the 5 s the server asks for."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(
            client, retries=1, retry_after=False, min_delay=0.01, max_delay=0.01, jitter=False
        )
        # With retry_after on, a 5 s demand above max_delay would stop the retries instead.
        assert get("/limited", id="off", retry_after=5)["attempt"] == 2
    (gap,) = http_service.gaps("/limited", "off")
    assert gap < 2.5


def test_retry_after_longer_than_max_delay_stops(
    http_server: str, http_service: DemoServer
) -> None:
    """A ``Retry-After`` above ``max_delay`` stops retrying: the 429 propagates at once."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=3, min_delay=0.01, max_delay=2, jitter=False)
        started = time.monotonic()
        with pytest.raises(httpx.HTTPStatusError) as info:
            get("/limited", id="long", retry_after=60)
    assert info.value.response.status_code == 429
    assert time.monotonic() - started < 2
    assert http_service.count("/limited", "long") == 1


def test_set_testing_skips_the_retry_after_wait(http_server: str, http_service: DemoServer) -> None:
    """Under ``set_testing()`` a 429 is still retried, without its ``Retry-After`` wait."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=2, retry_on=httpx.HTTPStatusError)
        with opero.set_testing():
            assert get("/limited", id="st", retry_after=5)["attempt"] == 2
    (gap,) = http_service.gaps("/limited", "st")
    assert gap < 2.5  # not the 5 s the server asked for


def test_timeout_gives_up_with_the_last_error(http_server: str, http_service: DemoServer) -> None:
    """``timeout=1`` bounds the whole call: it ends near 1 s with the last ``HTTPStatusError``."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=100, min_delay=0.2, backoff_factor=1, jitter=False, timeout=1)
        started = time.monotonic()
        with pytest.raises(httpx.HTTPStatusError) as info:
            get("/status/503", id="dl")
        elapsed = time.monotonic() - started
    assert info.value.response.status_code == 503
    # No wait begins that would end past the deadline: at most 1 s of waits plus one attempt.
    assert elapsed < 2.5
    assert 2 <= http_service.count("/status/503", "dl") <= 6


def test_timeout_refuses_a_retry_after_wait_past_the_deadline(
    http_server: str, http_service: DemoServer
) -> None:
    """A 5 s ``Retry-After`` inside a 2 s ``timeout`` is not waited: the 429 propagates at once."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=3, max_delay=10, timeout=2)
        started = time.monotonic()
        with pytest.raises(httpx.HTTPStatusError) as info:
            get("/limited", id="late", retry_after=5)
    assert info.value.response.status_code == 429
    assert time.monotonic() - started < 1.5
    assert http_service.count("/limited", "late") == 1


def test_set_testing_attempts_one_sends_one_request(
    http_server: str, http_service: DemoServer
) -> None:
    """``set_testing(attempts=1)`` makes one request: the 503 propagates without a retry."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=5)
        with opero.set_testing(attempts=1), pytest.raises(httpx.HTTPStatusError):
            get("/flaky", id="one", fail=1)
    assert http_service.count("/flaky", "one") == 1


def test_attempt_timeout_cancels_a_slow_attempt(http_server: str, http_service: DemoServer) -> None:
    """``attempt_timeout`` cancels each slow async attempt; TimeoutError propagates at the end."""

    async def main() -> Any:
        async with httpx.AsyncClient(base_url=http_server) as client:
            get = _agetter(
                client,
                retries=1,
                attempt_timeout=0.3,
                retry_on=(httpx.HTTPError, TimeoutError),
                retry_predicate=None,
                **NO_WAIT,
            )
            return await get("/slow", delay=10, id="at")

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - started < 5
    assert http_service.count("/slow", "at") == 2


def test_attempt_timeout_on_sync_function_is_a_configuration_error() -> None:
    """``attempt_timeout`` on a sync function is refused at decoration time, naming the option."""
    with pytest.raises(opero.ConfigurationError, match="attempt_timeout"):
        op(attempt_timeout=1.0)(lambda url: url)


def test_retry_on_result_polls_a_pending_job(http_server: str, http_service: DemoServer) -> None:
    """``retry_on_result`` retries a 200 whose JSON says pending, until it says done."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(
            client, retries=5, retry_on_result=lambda body: body["status"] == "pending", **NO_WAIT
        )
        assert get("/job/j1", pending=2) == {"id": "j1", "status": "done"}
    assert http_service.count("/job/j1") == 3


def test_retry_on_result_exhausted_carries_the_last_body(
    http_server: str, http_service: DemoServer
) -> None:
    """A job pending after every retry raises RetryResultError carrying the last JSON body."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(
            client, retries=2, retry_on_result=lambda body: body["status"] == "pending", **NO_WAIT
        )
        with pytest.raises(opero.RetryResultError) as info:
            get("/job/j2", pending=100)
    assert info.value.result == {"id": "j2", "status": "pending"}
    assert info.value.attempts == 3
    assert http_service.count("/job/j2") == 3


def test_a_pending_result_is_not_cached(http_server: str, http_service: DemoServer) -> None:
    """A result that ``retry_on_result`` rejected is not cached: the server is asked again."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(
            client,
            retries=0,
            cache=True,
            retry_on_result=lambda body: body["status"] == "pending",
        )
        with pytest.raises(opero.RetryResultError):
            get("/job/j3", pending=1)
        assert get("/job/j3", pending=1) == {"id": "j3", "status": "done"}
        assert get("/job/j3", pending=1) == {"id": "j3", "status": "done"}  # now cached
    assert http_service.count("/job/j3") == 2


def test_breaker_opens_and_fails_fast(http_server: str, http_service: DemoServer) -> None:
    """After 3 failed calls the breaker opens: the 4th fails with CircuitOpenError, no request."""
    breaker = opero.CircuitBreaker(failures=3, reset_after=30.0)
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=0, circuit_breaker=breaker)
        for _ in range(3):
            with pytest.raises(httpx.HTTPStatusError):
                get("/status/503", id="cb")
        with pytest.raises(opero.CircuitOpenError):
            get("/status/503", id="cb")
    assert http_service.count("/status/503", "cb") == 3
    assert isinstance(opero.CircuitOpenError("x"), opero.OperoError)
    assert breaker.state == "open"
    assert breaker.failures == 3


def test_breaker_closes_after_a_successful_probe(
    http_server: str, http_service: DemoServer
) -> None:
    """After ``reset_after`` one probe reaches the recovered server and closes the circuit."""
    breaker = opero.CircuitBreaker(failures=2, reset_after=0.3)
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=0, circuit_breaker=breaker)
        for _ in range(2):
            with pytest.raises(httpx.HTTPStatusError):
                get("/flaky", id="hb", fail=2)
        with pytest.raises(opero.CircuitOpenError):
            get("/flaky", id="hb", fail=2)
        time.sleep(0.4)
        assert get("/flaky", id="hb", fail=2) == {"id": "hb", "attempt": 3}
    assert breaker.state == "closed"
    assert http_service.count("/flaky", "hb") == 3


def test_cache_answers_while_the_breaker_is_open(
    http_server: str, http_service: DemoServer
) -> None:
    """A cached GET is still answered while the breaker is open; an uncached one fails fast."""
    breaker = opero.CircuitBreaker(failures=1, reset_after=30.0)
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=0, cache=True, circuit_breaker=breaker)
        assert get("/json/7") == {"id": "7", "name": "item 7"}
        with pytest.raises(httpx.HTTPStatusError):
            get("/status/503")
        assert breaker.state == "open"
        assert get("/json/7") == {"id": "7", "name": "item 7"}  # from the cache
        with pytest.raises(opero.CircuitOpenError):
            get("/json/8")
    assert http_service.count("/json/7") == 1
    assert http_service.count("/json/8") == 0


def test_breaker_rides_out_an_outage() -> None:
    """A service that goes down opens the breaker on ConnectErrors; once back, a probe closes it."""
    server = DemoServer()
    port = server.port
    breaker = opero.CircuitBreaker(failures=2, reset_after=0.3)
    try:
        with httpx.Client(base_url=server.url, timeout=2) as client:
            get = _getter(client, retries=0, circuit_breaker=breaker)
            assert get("/json/1") == {"id": "1", "name": "item 1"}
            server.stop()  # the outage
            for _ in range(2):
                with pytest.raises(httpx.ConnectError):
                    get("/json/1")
            with pytest.raises(opero.CircuitOpenError):
                get("/json/1")
            server = DemoServer(port)  # back, on the same port
            time.sleep(0.4)
            assert get("/json/2") == {"id": "2", "name": "item 2"}
            assert breaker.state == "closed"
            assert server.count() == 1  # the probe: no request was made while it was open
    finally:
        server.stop()


def test_rate_limit_per_host(http_server: str, http_service: DemoServer) -> None:
    """A ``rate_limit_key`` callable gives each host its own bucket: only the same host waits."""
    port = urlsplit(http_server).port
    waits = _Waits()
    with httpx.Client() as client:
        get = _getter(
            client,
            retries=0,
            rate_limit=0.1,
            rate_limit_key=lambda url, **kw: urlsplit(url).hostname,
            _sleep=waits,
        )
        get(f"http://127.0.0.1:{port}/json/a")
        get(f"http://localhost:{port}/json/b")
        assert waits.positive() == []  # two hosts, two buckets: no wait
        get(f"http://127.0.0.1:{port}/json/c")
    (wait,) = waits.positive()
    assert 5 < wait <= 10  # one call per 10 s on 127.0.0.1
    assert {r.host for r in http_service.requests()} == {"127.0.0.1", "localhost"}


@pytest.mark.redis
def test_rate_limit_per_host_in_redis(
    http_server: str, http_service: DemoServer, redis_url: str
) -> None:
    """Per-host buckets in Redis: two functions (two "processes") share the 127.0.0.1 bucket."""
    port = urlsplit(http_server).port
    waits = _Waits()
    options: dict[str, Any] = {
        "retries": 0,
        "rate_limit": 0.1,
        "rate_limit_key": lambda url, **kw: f"http-test:{urlsplit(url).hostname}",
        "rate_limit_backend": "redis",
        "rate_limit_redis_url": redis_url,
        "_sleep": waits,
    }
    with httpx.Client() as one, httpx.Client() as two:
        first, second = _getter(one, **options), _getter(two, **options)
        first(f"http://127.0.0.1:{port}/json/a")
        second(f"http://localhost:{port}/json/b")
        assert waits.positive() == []  # two hosts, two buckets
        second(f"http://127.0.0.1:{port}/json/c")  # the bucket `first` used
    (wait,) = waits.positive()
    assert 5 < wait <= 10
    assert http_service.count() == 3


def test_rate_limit_several_windows(http_server: str, http_service: DemoServer) -> None:
    """``rate_limit=[(2, 1.0), (3, 60.0)]``: each window delays the call it is full for."""
    waits = _Waits()
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=0, rate_limit=[(2, 1.0), (3, 60.0)], _sleep=waits)
        for i in range(4):
            get(f"/json/{i}")
    # Sliding windows: the 3rd call waits for the second window (about 1 s after the
    # 1st), the 4th for the minute window (about 60 s after the 1st).
    third, fourth = waits.positive()
    assert 0.5 < third <= 1.0
    assert 50 < fourth <= 60
    assert http_service.count() == 4


def test_hooks_receive_call_details(http_server: str, http_service: DemoServer) -> None:
    """An ``on_retry`` hook taking one argument receives a ``CallDetails`` per retry."""
    seen: list[opero.CallDetails] = []

    def on_retry(details: opero.CallDetails) -> None:
        seen.append(details)

    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=3, on_retry=on_retry, **NO_WAIT)
        get("/flaky", id="hk", fail=2)
    assert len(seen) == 2
    assert all(isinstance(d, opero.CallDetails) for d in seen)
    assert all(isinstance(d.exception, httpx.HTTPStatusError) for d in seen)
    assert [(d.event, d.attempt, d.args, d.kwargs) for d in seen] == [
        ("retry", 1, ("/flaky",), {"id": "hk", "fail": 2}),
        ("retry", 2, ("/flaky",), {"id": "hk", "fail": 2}),
    ]


def test_stats_count_calls_retries_and_hits(http_server: str, http_service: DemoServer) -> None:
    """``f.stats()`` counts the calls, retries and cache hits seen against the server."""
    with httpx.Client(base_url=http_server) as client:
        get = _getter(client, retries=3, cache=True, **NO_WAIT)
        get("/flaky", id="st", fail=1)
        get("/flaky", id="st", fail=1)
    stats = get.stats()  # type: ignore[attr-defined]
    assert (stats.calls, stats.retries, stats.cache_hits, stats.cache_misses) == (2, 1, 1, 1)
    assert http_service.count("/flaky", "st") == 2


# --- the migration page's comparison ---------------------------------------------------


def _counted_lines(code: str) -> int:
    """Count the lines of code above the checks' marker: not blank, not a comment."""
    client = code.split(CHECKS_MARKER, 1)[0]
    return sum(
        1 for line in client.splitlines() if line.strip() and not line.strip().startswith("#")
    )


CHECKS_MARKER = "# ---- not counted"
MIGRATING = Path(__file__).resolve().parents[1] / "docs" / "migrating.md"


def test_migration_page_states_true_line_counts() -> None:
    """The HTTP client comparison states the line counts its two code blocks really have."""
    text = MIGRATING.read_text(encoding="utf-8")
    start = text.index("## A client for an HTTP API")
    end = text.index("\n## ", start + 1)
    first_line = text.count("\n", 0, start) + 1
    last_line = text.count("\n", 0, end) + 1
    blocks = [
        b
        for b in extract_blocks(MIGRATING)
        if b.language == "python" and first_line < b.line < last_line
    ]
    assert len(blocks) == 2
    assert all(CHECKS_MARKER in b.code for b in blocks)
    # The checks below the marker are the same in both versions (bar their imports).
    checks = [b.code.split(CHECKS_MARKER, 1)[1].split("async def main", 1)[1] for b in blocks]
    assert checks[0] == checks[1]
    section = text[start:end]
    stated_tenacity = re.search(r"\*\*(\d+) lines\*\* with tenacity", section)
    stated_opero = re.search(r"\*\*(\d+) lines\*\* with opero", section)
    assert stated_tenacity is not None
    assert stated_opero is not None
    tenacity_lines, opero_lines = (_counted_lines(b.code) for b in blocks)
    assert (int(stated_tenacity[1]), int(stated_opero[1])) == (tenacity_lines, opero_lines)
