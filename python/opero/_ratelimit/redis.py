"""A rate limit shared by every process and host through Redis (``rate_limit_backend="redis"``).

Each decision is one atomic Lua script (one ``EVALSHA`` round trip) running
GCRA on the Redis server's clock (``redis.call('TIME')``), so the clocks of the
calling hosts never matter. The state is the theoretical arrival time in
microseconds, the interval its tokens were booked at (so a changed rate
rescales the debt instead of reinterpreting it) and the last booked start, under the key
``{opero:rl:<key>}``: the whole key is a Redis Cluster hash tag, so it lives in
one slot and the script never crosses slots. The key expires once the bucket is
full again, so idle limits leave nothing behind.

Guarantee (the same as the in-process bucket): over any window of T seconds at
most ``burst + rate * T`` calls are scheduled to start, across every process
sharing the key. :meth:`RedisRateLimiter.reserve` returns the wait before the
reserved call may start; the caller sleeps, the limiter never does.

When Redis is down the limiter falls back to a local
:class:`opero._opero_core.TokenBucket` with the same rate and burst (so the
limit holds per process, not globally, during the outage), logs the outage
once on the ``opero`` logger, probes Redis again at most every
``retry_interval`` seconds and goes back to the shared bucket when Redis returns.

A full connection pool is not an outage: Redis is answering the commands that
hold the connections. A decision then waits for a free connection (at most
``pool_timeout`` seconds) and, if none frees up, raises
:class:`~opero.errors.RateLimitTimeout`: the call is not started. The local
bucket is never used while Redis is up, so the shared limit is never exceeded.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

from opero._connections.health import Outage, outage_for
from opero._connections.redis import (
    PoolExhausted,
    RedisConnector,
    check_interval,
    import_redis,
    pool_exhausted,
    redact,
)
from opero._ratelimit.keyed import MAX_KEYS, KeyedBuckets, bucket_key
from opero._ratelimit.windows import Windows, check_windows
from opero.errors import ConfigurationError, RateLimitTimeout

if TYPE_CHECKING:
    import redis

__all__ = ["GCRA_SCRIPT", "GCRA_SHA", "WINDOWS_SCRIPT", "WINDOWS_SHA", "RedisRateLimiter"]

# Without redis-py, choosing this limiter is a ConfigurationError saying what to install.
NoScriptError = import_redis("rate_limit_backend='redis'").exceptions.NoScriptError

GCRA_SCRIPT = """
-- KEYS[1]: the bucket; ARGV[1]: microseconds per token (1e6 / rate); ARGV[2]: burst.
-- Returns {server time, wait}, both in microseconds: the reserved call may start
-- at server time + wait. The state is "<tat> <interval> <last start>": the
-- theoretical arrival time (TAT), the interval its tokens were booked at, and the
-- start of the latest call that had to wait (a bare TAT, as older versions stored
-- it, counts as booked at this call's interval). The rules are the native
-- bucket's (rust/ratelimit.rs): a decision at another interval rescales the tokens
-- owed to it, and no call starts less than one interval after the last booked one.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local raw = redis.call('GET', KEYS[1])
local tat = nil
local booked = interval
local last = nil
if raw then
  local a, b, c = string.match(raw, '^(%S+) (%S+) (%S+)$')
  if a then
    tat = tonumber(a)
    booked = tonumber(b) or interval
    last = tonumber(c)
  else
    tat = tonumber(raw)
  end
end
if tat == nil or tat < now then
  tat = now
elseif booked > 0 and booked ~= interval then
  tat = now + (tat - now) / booked * interval
end
local start = tat - (burst - 1) * interval
if last ~= nil and last + interval > start then start = last + interval end
local wait = 0
if start > now then
  wait = math.ceil(start - now)
  last = now + wait
end
local new_tat = math.ceil(tat + interval)
local expire_at = new_tat
if last ~= nil and last > expire_at then expire_at = last end
-- Times are written with %.17g, never %d: a schedule pushed far ahead (calls refused
-- by rate_max_wait stay booked) must not wrap around at 2^63 into the past. The
-- expiry is capped at 2^53 ms (285,000 years).
local ttl = math.min(math.ceil((expire_at - now) / 1000) + 1000, 9007199254740992)
redis.call('SET', KEYS[1], string.format('%.17g %.17g %.17g', new_tat, interval, last or 0),
           'PX', string.format('%d', ttl))
return {string.format('%d', now), string.format('%.17g', wait)}
"""


GCRA_SHA = hashlib.sha1(GCRA_SCRIPT.encode()).hexdigest()
"""The script's SHA1, the name ``EVALSHA`` runs it by."""

WINDOWS_SCRIPT = """
-- Several sliding windows booked at once (rate_limit=[(calls, seconds), ...]).
-- KEYS[i]: the list of the last starts of window i (microseconds, oldest first);
-- ARGV[2i-1], ARGV[2i]: its calls and its period in microseconds.
-- Returns {server time, wait} in microseconds: the earliest start every window
-- admits (the oldest of a window's last `calls` starts must be `period` old),
-- booked in every window before the script returns, so no window is booked
-- without the others. Each list expires once its last start has left its window.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local start = now
for i, key in ipairs(KEYS) do
  local calls = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  if redis.call('LLEN', key) >= calls then
    local oldest = tonumber(redis.call('LINDEX', key, -calls))
    if oldest ~= nil and oldest + period > start then start = oldest + period end
  end
end
for i, key in ipairs(KEYS) do
  local calls = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  -- %.17g, never %d: a start pushed far ahead must not wrap around at 2^63 into the
  -- past; the expiry is capped at 2^53 ms (285,000 years).
  redis.call('RPUSH', key, string.format('%.17g', start))
  redis.call('LTRIM', key, -calls, -1)
  local ttl = math.min(math.ceil((start + period - now) / 1000) + 1000, 9007199254740992)
  redis.call('PEXPIRE', key, string.format('%d', ttl))
end
return {string.format('%d', now), string.format('%.17g', start - now)}
"""

WINDOWS_SHA = hashlib.sha1(WINDOWS_SCRIPT.encode()).hexdigest()
"""The windows script's SHA1."""


def _check_rate(rate: Any, name: str = "rate") -> float:
    """Return a positive finite rate, or raise ConfigurationError."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise ConfigurationError(f"{name}={rate!r} must be a finite number of calls per second > 0")
    return float(rate)


class RedisRateLimiter:
    """A GCRA token bucket stored in Redis, shared by every process and host using ``key``.

    Args:
        key: The bucket's name (``rate_limit_key``); every limiter with the
            same key on the same Redis shares one bucket. ``None`` for a keyed
            limiter: each decision names its bucket (:meth:`reserve_key`).
        rate: Calls per second sustained (> 0).
        burst: Calls that may start at once (>= 1). Default 1.
        url: Redis URL; ``None`` reads ``OPERO_REDIS_URL`` at first use, else
            ``redis://localhost:6379/0``.
        client: A ``redis.Redis`` or ``redis.asyncio.Redis`` instead of a URL.
        socket_timeout: Seconds a decision may take before Redis counts as down.
            Default 0.5.
        connect_timeout: Seconds a connection attempt may take. Default 0.5.
        retry_interval: Seconds between probes of a Redis that is down (the
            local bucket decides meanwhile). Default 1.0.
        max_connections: Connections per pool when the client is built from a
            URL (per process, and per event loop). Default 100.
        pool_timeout: Seconds a decision waits for a free connection when the
            pool is full, before :class:`~opero.errors.RateLimitTimeout`.
            Default 5.0.
        windows: ``((calls, seconds), ...)``: sliding windows instead of
            ``rate`` and ``burst`` (each a Redis list of its last starts).
        max_keys: The most local buckets kept per key during an outage.

    Raises:
        ConfigurationError: Empty key, a rate that is not > 0, a burst that is
            not an int >= 1, a malformed URL or a bad timeout.

    """

    def __init__(
        self,
        key: str | None,
        rate: float,
        burst: int = 1,
        *,
        url: str | None = None,
        client: Any = None,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        retry_interval: float = 1.0,
        max_connections: int = 100,
        pool_timeout: float = 5.0,
        windows: tuple[tuple[int, float], ...] | None = None,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if key is not None and (not isinstance(key, str) or not key):
            raise ConfigurationError(
                f"rate_limit_key={key!r} must be a non-empty string naming the shared bucket"
            )
        self.rate = _check_rate(rate, "rate_limit")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigurationError(f"rate_burst={burst!r} must be an int >= 1")
        self.key = key
        self.burst = burst
        self.windows = None if windows is None else check_windows(windows)
        self.max_keys = max_keys
        self.redis_key = "" if key is None else self._redis_keys(key)[0]
        self.connector = RedisConnector(
            url,
            client=client,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            option="rate_limit_redis_url",
            max_connections=max_connections,
            pool_timeout=pool_timeout,
        )
        self.retry_interval = check_interval(retry_interval)
        self._url = url
        self._outage: Outage | None = None
        self._local: Any = None
        self._local_keyed: KeyedBuckets | None = None

    def _redis_keys(self, name: str) -> list[str]:
        """Return the Redis keys of bucket ``name``: one GCRA key, or a list per window."""
        if not name.isascii():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: Redis keys are UTF-8 bytes
                raw = name.encode("utf-8", "surrogatepass")
                name = "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()
        base = "{opero:rl:" + name + "}"
        if self.windows is None:
            return [base]
        return [f"{base}:w{calls}/{seconds!r}" for calls, seconds in self.windows]

    def _script_args(self, rate: float | None) -> tuple[str, str, tuple[Any, ...]]:
        """Return the script (SHA, source) and its ARGV for this limiter's kind."""
        if self.windows is None:
            return GCRA_SHA, GCRA_SCRIPT, self._args(rate)
        argv: list[Any] = []
        for calls, seconds in self.windows:
            argv += [calls, max(1, round(seconds * 1_000_000))]
        return WINDOWS_SHA, WINDOWS_SCRIPT, tuple(argv)

    def _new_local(self) -> Any:
        """Make a local bucket like this limiter's (used while Redis is down)."""
        if self.windows is not None:
            return Windows(self.windows)
        from opero._opero_core import TokenBucket

        return TokenBucket(self.rate, self.burst)

    @property
    def outage(self) -> Outage:
        """The process-wide reachability state of this limiter's Redis."""
        if self._outage is None:
            self._outage = outage_for(
                f"Redis rate limiter at {redact(self.connector.url)}", self.retry_interval
            )
        return self._outage

    def _args(self, rate: float | None) -> tuple[float, int]:
        """Return the script's ARGV: microseconds per token and burst."""
        if rate is None:
            rate = self.rate
        elif rate != self.rate:
            rate = _check_rate(rate, "rate_limit")
        return 1_000_000.0 / rate, self.burst

    def _fallback(self, rate: float | None, name: str | None = None) -> float:
        """Decide with the local bucket (Redis is down); per name for a keyed limiter."""
        if name is None or name == self.key:
            bucket = self._local
            if bucket is None:
                bucket = self._local = self._new_local()
        else:
            keyed = self._local_keyed
            if keyed is None:
                keyed = self._local_keyed = KeyedBuckets(
                    self._new_local, self.max_keys, "a per-key Redis rate limit"
                )
            bucket = keyed.bucket(name)
        if self.windows is None:
            wanted = self.rate if rate is None else rate
            if bucket.rate != wanted:
                bucket.set_rate(wanted)
        return float(bucket.reserve())

    def _label(self, name: str | None) -> str:
        """Name the bucket in messages: ``rate limit 'key'`` (a keyed limiter: the key decided)."""
        if self.key is None:
            return f"per-key rate limit (deciding key {name!r})"
        return f"rate limit {self.key!r}"

    def _failed(self, exc: Exception, name: str | None = None) -> None:
        """Record a Redis failure (logged once per outage); re-raise anything else.

        Raises:
            RateLimitTimeout: The connection pool stayed full (back-pressure, not
                an outage): the call must not start unchecked.
            Exception: ``exc`` itself when it is not a Redis or socket error.

        """
        import redis

        if isinstance(exc, PoolExhausted) or pool_exhausted(exc):
            raise RateLimitTimeout(f"{self._label(name)}: {exc}; the call was not started") from exc
        if not isinstance(exc, redis.RedisError | OSError):
            raise exc
        self.outage.failed(exc, f"{self._label(name)} uses a local per-process bucket")

    def reserve_with_time(
        self, rate: float | None = None, name: str | None = None
    ) -> tuple[float, float]:
        """Reserve one call; return ``(server_time, wait)`` in seconds.

        ``server_time`` is the Redis clock at the decision (``nan`` when the
        local fallback decided), ``wait`` the seconds before the call may start.

        Args:
            rate: Overrides the configured rate for this decision (a callable
                ``rate_limit`` read on this call); ``None`` uses ``rate``.
            name: The bucket (a keyed limiter); ``None`` uses ``key``.

        """
        sha, script, args = self._script_args(rate)
        outage = self.outage
        if outage.down and not outage.should_try():
            return math.nan, self._fallback(rate, name)
        keys = self._redis_keys(name) if name is not None else self._redis_keys(self._own_key())

        def decide(client: redis.Redis) -> Any:
            try:
                return client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # a restarted or different server: load it once
                client.script_load(script)
                return client.evalsha(sha, len(keys), *keys, *args)

        try:
            now, wait = self.connector.run(decide)
        except Exception as exc:
            self._failed(exc, name)
            return math.nan, self._fallback(rate, name)
        if outage.down:
            outage.succeeded()
        return int(now) / 1e6, float(wait) / 1e6

    def _own_key(self) -> str:
        """Return the bucket of a limiter built with a key (a keyed one names it per decision)."""
        if self.key is None:
            raise TypeError("this RedisRateLimiter is keyed: use reserve_key(name)")
        return self.key

    def reserve_key(self, name: Any, rate: float | None = None) -> float:
        """Reserve one call in bucket ``name`` (what a callable ``rate_limit_key`` returned).

        Raises:
            TypeError: ``name`` is not a ``str``, naming ``rate_limit_key``.

        """
        return self.reserve_with_time(rate, bucket_key(name, "a Redis rate limit"))[1]

    async def areserve_key(self, name: Any, rate: float | None = None) -> float:
        """Async :meth:`reserve_key`."""
        return await self._areserve(rate, bucket_key(name, "a Redis rate limit"))

    def reserve(self, rate: float | None = None) -> float:
        """Reserve one call; return the seconds to wait before it may start (0.0 if now).

        Args:
            rate: Overrides the configured rate for this decision; ``None`` uses ``rate``.

        """
        return self.reserve_with_time(rate)[1]

    async def areserve(self, rate: float | None = None) -> float:
        """Async :meth:`reserve` through ``redis.asyncio`` (never blocks the event loop).

        Args:
            rate: Overrides the configured rate for this decision; ``None`` uses ``rate``.

        """
        return await self._areserve(rate, None)

    async def _areserve(self, rate: float | None, name: str | None) -> float:
        """Async decision in bucket ``name`` (``None``: this limiter's key)."""
        sha, script, args = self._script_args(rate)
        outage = self.outage
        if outage.down and not outage.should_try():
            return self._fallback(rate, name)
        keys = self._redis_keys(name) if name is not None else self._redis_keys(self._own_key())

        async def decide(client: redis.asyncio.Redis) -> Any:
            try:
                return await client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                await client.script_load(script)
                return await client.evalsha(sha, len(keys), *keys, *args)

        try:
            _now, wait = await self.connector.arun(decide)
        except Exception as exc:
            self._failed(exc, name)
            return self._fallback(rate, name)
        if outage.down:
            outage.succeeded()
        return float(wait) / 1e6

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by configuration (URL-based limiters only), for process pools."""
        if self.connector._client is not None:
            raise TypeError(
                "a RedisRateLimiter built on a client object cannot be pickled; "
                "use rate_limit_redis_url='redis://...' to share it with worker processes"
            )
        return (
            _rebuild,
            (
                self.key,
                self.rate,
                self.burst,
                self._url,
                self.connector.socket_timeout,
                self.connector.connect_timeout,
                self.retry_interval,
                self.connector.max_connections,
                self.connector.pool_timeout,
                self.windows,
                self.max_keys,
            ),
        )

    def __repr__(self) -> str:
        """Show the key, rate, burst and server (password hidden)."""
        return (
            f"RedisRateLimiter({self.key!r}, rate={self.rate}, burst={self.burst}, "
            f"url={redact(self.connector.url)!r})"
        )


def _rebuild(
    key: str | None,
    rate: float,
    burst: int,
    url: str | None,
    socket_timeout: float,
    connect_timeout: float,
    retry_interval: float,
    max_connections: int = 100,
    pool_timeout: float = 5.0,
    windows: tuple[tuple[int, float], ...] | None = None,
    max_keys: int = MAX_KEYS,
) -> RedisRateLimiter:
    """Unpickle a :class:`RedisRateLimiter`."""
    return RedisRateLimiter(
        key,
        rate,
        burst,
        url=url,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        retry_interval=retry_interval,
        max_connections=max_connections,
        pool_timeout=pool_timeout,
        windows=windows,
        max_keys=max_keys,
    )
