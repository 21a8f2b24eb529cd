"""A small, real HTTP service for the tests and the docs: flaky, rate-limited and slow answers.

:class:`DemoServer` runs the standard library's ``ThreadingHTTPServer`` in a
daemon thread on a free loopback port. Each path has a scripted behaviour, and
the counters behind them are kept per ``(path, id)``, where ``id`` is a query
parameter, so two tests (or two docs examples) never share state:

- ``GET /flaky?id=X&fail=N``: 503 for the first ``N`` requests of ``X``, then
  200 with ``{"id": X, "attempt": k}``.
- ``GET /limited?id=X&retry_after=S&fail=N``: 429 with ``Retry-After: S``
  (seconds, default 1) for the first ``N`` (default 1) requests, then 200.
  With ``&format=date`` the header is an HTTP date at least ``S`` seconds ahead;
  with ``&header=TEXT`` it is ``TEXT`` as given (to send malformed values).
- ``GET /slow?delay=S``: sleeps ``S`` seconds, then 200.
- ``GET /json/{id}``: 200 with ``{"id": id, "name": "item {id}"}``.
- ``GET /job/{id}?pending=N``: ``{"status": "pending"}`` for the first ``N``
  requests, then ``{"status": "done"}`` (a job still running).
- ``GET /status/{code}``: always answers ``code`` (``/status/503``: a service down).
- ``GET /log?id=X``: the arrival times of ``X``'s requests (the log itself is not logged).

Every request is recorded with its arrival time (``time.monotonic()``), so a
test can check the gaps a client left between retries. ``tests/conftest.py``
turns it into the ``http_server`` (the base URL) and ``http_service`` (this
object) fixtures; ``python tests/httpserver.py [PORT]`` serves it by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["DemoServer", "Request", "serve"]

MAX_DELAY = 30.0
"""The longest ``/slow`` sleep the server accepts (a typo must not hang a test run)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One request the server received."""

    method: str
    path: str  # without the query
    id: str | None  # the ``id`` query parameter (or the ``{id}`` of ``/json`` and ``/job``)
    host: str  # the Host header, without the port
    arrival: float  # time.monotonic() when the request line was read
    status: int | None  # the status code answered; None while the answer is being made


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx clients use it

    def setup(self) -> None:
        super().setup()
        self.server.demo._connected(self.connection, open_=True)

    def finish(self) -> None:
        self.server.demo._connected(self.connection, open_=False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the test output is not the place for an access log."""

    def do_GET(self) -> None:
        arrival = time.monotonic()
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path.rstrip("/") or "/"
        demo = self.server.demo
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        # Recorded on arrival, so a request still being answered (a /slow one) counts.
        place = None if path == "/log" else demo._arrive("GET", path, query, host, arrival)
        try:
            status, headers, body = demo._answer(path, query)
        except (ValueError, KeyError) as exc:
            status, headers, body = 400, {}, {"error": str(exc)}
        if place is not None:
            demo._answered(place, status)
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a cancelled attempt): nothing to answer to.
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    demo: DemoServer


class DemoServer:
    """A scripted HTTP service on ``127.0.0.1`` (see the module docstring for its paths).

    Args:
        port: The port to listen on; 0 (the default) picks a free one.

    """

    def __init__(self, port: int = 0) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str | None]] = Counter()
        self._requests: list[Request] = []
        self._generation = 0  # bumped by reset(), so a late answer is not recorded on another
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.demo = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="opero-test-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    # --- what the server saw ----------------------------------------------------------

    def requests(self, path: str | None = None, id: str | None = None) -> list[Request]:
        """Return the requests received, oldest first, filtered by path and ``id`` when given."""
        with self._lock:
            return [
                r
                for r in self._requests
                if (path is None or r.path == path) and (id is None or r.id == id)
            ]

    def count(self, path: str | None = None, id: str | None = None) -> int:
        """Return how many requests arrived (for ``path`` and ``id`` when given)."""
        return len(self.requests(path, id))

    def gaps(self, path: str | None = None, id: str | None = None) -> list[float]:
        """Return the seconds between consecutive arrivals (for ``path`` and ``id``)."""
        arrivals = [r.arrival for r in self.requests(path, id)]
        return [b - a for a, b in itertools.pairwise(arrivals)]

    def reset(self) -> None:
        """Forget every request and counter (the fixture does this before each test)."""
        with self._lock:
            self._counts.clear()
            self._requests.clear()
            self._generation += 1

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop serving, like a service going down: no new connection, open ones cut.

        Wakes any ``/slow`` sleeper and shuts the kept-alive connections down, so a
        client's pooled connection fails too (as after a real outage) instead of
        being answered by a leftover handler thread.
        """
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def __enter__(self) -> DemoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- behaviours ---------------------------------------------------------------------

    def _arrive(
        self, method: str, path: str, query: dict[str, str], host: str, arrival: float
    ) -> tuple[int, int]:
        """Record a request as it arrives; return its place for :meth:`_answered`."""
        ident = query.get("id")
        for prefix in ("/json/", "/job/"):
            if path.startswith(prefix):
                ident = path.removeprefix(prefix)
        with self._lock:
            self._requests.append(Request(method, path, ident, host, arrival, None))
            return self._generation, len(self._requests) - 1

    def _answered(self, place: tuple[int, int], status: int) -> None:
        """Record the status answered to the request at ``place`` (unless reset since)."""
        generation, index = place
        with self._lock:
            if generation == self._generation:
                self._requests[index] = dataclasses.replace(self._requests[index], status=status)

    def _connected(self, connection: socket.socket, *, open_: bool) -> None:
        """Track the open client connections (for :meth:`stop`)."""
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _nth(self, path: str, ident: str | None) -> int:
        """Count one more request of ``(path, ident)`` and return its 1-based number."""
        with self._lock:
            self._counts[path, ident] += 1
            return self._counts[path, ident]

    def _answer(self, path: str, query: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        """Return (status, headers, JSON body) for one request."""
        ident = query.get("id")
        if path == "/flaky":
            n = self._nth(path, ident)
            if n <= int(query.get("fail", "1")):
                return 503, {}, {"error": "service unavailable"}
            return 200, {}, {"id": ident, "attempt": n}
        if path == "/limited":
            n = self._nth(path, ident)
            if n <= int(query.get("fail", "1")):
                seconds = float(query.get("retry_after", "1"))
                if "header" in query:  # a raw value, malformed ones included
                    value = query["header"]
                    if not value.isprintable():
                        raise ValueError("the header must be printable (no CR, LF or NUL)")
                elif query.get("format") == "date":
                    # An HTTP date has whole seconds: round up, so the wait is >= seconds.
                    value = formatdate(math.ceil(time.time() + seconds), usegmt=True)
                else:
                    value = f"{seconds:g}"
                return 429, {"Retry-After": value}, {"error": "too many requests"}
            return 200, {}, {"id": ident, "attempt": n}
        if path == "/slow":
            delay = float(query.get("delay", "1"))
            if not 0 <= delay <= MAX_DELAY:
                raise ValueError(f"delay must be in [0, {MAX_DELAY:g}] seconds")
            self._stopping.wait(delay)
            return 200, {}, {"id": ident, "slept": delay}
        if path.startswith("/json/"):
            key = path.removeprefix("/json/")
            return 200, {}, {"id": key, "name": f"item {key}"}
        if path.startswith("/job/"):
            key = path.removeprefix("/job/")
            n = self._nth("/job", key)
            done = n > int(query.get("pending", "0"))
            return 200, {}, {"id": key, "status": "done" if done else "pending"}
        if path.startswith("/status/"):
            code = int(path.removeprefix("/status/"))
            if not 200 <= code <= 599:
                raise ValueError("the status must be in [200, 599]")
            return code, {}, {"status": code}
        if path == "/log":
            return 200, {}, [r.arrival for r in self.requests(id=ident)]
        return 404, {}, {"error": f"no such path: {path}"}


def serve(port: int = 0) -> Iterator[DemoServer]:
    """Yield a running :class:`DemoServer` and stop it afterwards (a fixture's body)."""
    server = DemoServer(port)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    with DemoServer(int(sys.argv[1]) if len(sys.argv) > 1 else 8000) as demo:
        print(f"serving on {demo.url} (Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
