"""A private ``redis-server`` on a free loopback port: the one launcher of the tests and the bench.

``tests/conftest.py`` (fixtures ``redis_server``, ``redis_url``,
``restartable_redis``) and the bench's ``redis`` group both start their servers
here, so the two never drift apart. A server started here:

* listens on 127.0.0.1 only, on a port that was free a moment before, with no
  persistence (``--save ""``, ``--appendonly no``), its working directory and
  log in a directory the caller owns;
* is ready when it answers ``INFO server`` with *its own* process id, so a
  server of someone else that took the port meanwhile is never used (nor
  flushed);
* dies with the thread that started it, on Linux with ``setpriv`` (util-linux
  2.33+) installed (parent-death signal): a test run or bench killed with SIGKILL, or stopped by
  the bench's watchdog, leaves no ``redis-server`` behind. Start it from a thread
  that outlives it (the main thread, a pytest fixture).

Not public API: the tests import it, users do not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "RedisServer",
    "find_redis_server",
    "free_port",
    "ping",
    "private_redis",
    "start_redis_server",
]

_FALLBACK_BINARY = "/usr/bin/redis-server"
_PID = re.compile(rb"process_id:(\d+)")


def find_redis_server() -> str | None:
    """Return the path of the ``redis-server`` executable, or ``None`` when it is not installed."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    return _FALLBACK_BINARY if os.access(_FALLBACK_BINARY, os.X_OK) else None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(port: int, command: bytes, timeout: float) -> bytes:
    """Send one inline command to 127.0.0.1:``port``; return the whole reply (RESP, raw)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command + b"\r\n")
        data = sock.recv(65536)
        if data.startswith(b"$"):  # a bulk string: read until its announced length is in
            header, _, _ = data.partition(b"\r\n")
            total = len(header) + 2 + int(header[1:]) + 2
            while len(data) < total:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data


def ping(port: int, timeout: float = 0.2) -> bool:
    """Return whether a Redis server on 127.0.0.1:``port`` answers PING with PONG.

    Args:
        port: The TCP port.
        timeout: Seconds to wait for the connection and for the reply.

    """
    try:
        return _command(port, b"PING", timeout).startswith(b"+PONG")
    except (OSError, ValueError):
        return False


def _server_pid(port: int, timeout: float = 0.2) -> int | None:
    """Return the ``process_id`` the server on ``port`` reports, or ``None`` if none answers."""
    try:
        match = _PID.search(_command(port, b"INFO server", timeout))
    except (OSError, ValueError):
        return None
    return int(match.group(1)) if match else None


@functools.cache
def _death_signal_prefix() -> tuple[str, ...]:
    """Return ``setpriv --pdeathsig TERM --`` where it exists and works (Linux), else ``()``.

    ``--pdeathsig`` needs util-linux 2.33 or later; an older ``setpriv`` (or
    one that fails for another reason) is not used, so the server still starts.
    """
    if not sys.platform.startswith("linux"):
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "TERM", "--")
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


class RedisServer:
    """A ``redis-server`` process on 127.0.0.1 that can be stopped and restarted.

    Args:
        binary: Path of the ``redis-server`` executable.
        directory: Working directory of the server and its log
            (``redis-<port>.log``); nothing is persisted there.
        port: The port to listen on; a free one by default. Kept across restarts.

    """

    def __init__(self, binary: str, directory: Path, port: int | None = None) -> None:
        self.binary = binary
        self.directory = Path(directory)
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer({self.url!r}, {state})"

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0 of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        """The file the server writes its log to."""
        return self.directory / f"redis-{self.port}.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers, as itself, on its port.

        Does nothing when it is already running.

        Args:
            timeout: Seconds to wait for the server to answer.

        Raises:
            RuntimeError: The server exited or did not answer within ``timeout``
                seconds (the port was taken, say); the message holds its log's tail.

        """
        if self.running:
            return
        argv = [
            *_death_signal_prefix(),
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--protected-mode",
            "yes",
        ]
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )
        self.process = process
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            # Our own pid, not just a PONG: another server may have taken the port.
            if _server_pid(self.port) == process.pid:
                return
            time.sleep(0.02)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and wait until it has exited."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def flushdb(self) -> None:
        """Empty every database of this server (test isolation between users of one server).

        Raises:
            RuntimeError: The server did not answer ``+OK``.

        """
        try:
            reply = _command(self.port, b"FLUSHALL", timeout=5)
        except OSError as exc:
            raise RuntimeError(f"FLUSHALL on port {self.port} failed: {exc}") from exc
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL on port {self.port} failed: {reply[:200]!r}")


def start_redis_server(
    directory: Path, binary: str | None = None, *, attempts: int = 5
) -> RedisServer:
    """Start a server on a free port, trying another port if one was taken meanwhile.

    Args:
        directory: Working directory of the server (see :class:`RedisServer`).
        binary: Path of ``redis-server``; found on ``PATH`` by default.
        attempts: Ports to try before giving up (>= 1).

    Returns:
        The running server; the caller stops it.

    Raises:
        FileNotFoundError: ``redis-server`` is not installed.
        RuntimeError: No attempt started; the message holds the last server log.

    """
    if binary is None:
        binary = find_redis_server()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    last: RuntimeError | None = None
    for _ in range(max(1, attempts)):
        server = RedisServer(binary, directory)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"could not start redis-server after {max(1, attempts)} ports: {last}")


@contextlib.contextmanager
def private_redis(binary: str | None = None) -> Iterator[RedisServer]:
    """Run a server in a temporary directory for the ``with`` block, then stop it.

    Args:
        binary: Path of ``redis-server``; found on ``PATH`` by default.

    Yields:
        The running server.

    Raises:
        FileNotFoundError: ``redis-server`` is not installed.
        RuntimeError: It did not start.

    """
    with tempfile.TemporaryDirectory(prefix="opero-redis-") as directory:
        server = start_redis_server(Path(directory), binary)
        try:
            yield server
        finally:
            server.stop()
