"""The state of a ``backend="redis"`` :class:`~opero.CircuitBreaker`, shared by every process.

Each decision is one atomic Lua script (``EVALSHA``) on the Redis server's
clock (``TIME``): admitting a call (:data:`ENTER_SCRIPT`), recording its
outcome (:data:`RECORD_SCRIPT`) and reading the state (:data:`READ_SCRIPT`).
While Redis is down the breaker's local state decides, logged once per outage
through :mod:`opero._connections.health`; Redis is probed again every second.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from typing import TYPE_CHECKING, Any

from opero._pipeline.breaker import RESET, Probe, _transition, logger

if TYPE_CHECKING:
    from opero._connections.health import Outage
    from opero._connections.redis import RedisConnector
    from opero._pipeline.breaker import CircuitBreaker

__all__ = ["ENTER_SCRIPT", "READ_SCRIPT", "RECORD_SCRIPT", "RESET_SCRIPT", "RedisState"]

#: Probe ids: this process's random prefix and a counter (unique across processes
#: and hosts without a system call per decision).
_PROBE_PREFIX = os.urandom(8).hex()
_PROBE_IDS = itertools.count(1)
#: The tasks giving back cancelled probes' slots (a reference until they finish).
_RELEASES: set[asyncio.Task[None]] = set()


def _after_fork_in_child() -> None:
    """Draw a new probe-id prefix in a forked child (the counter continues)."""
    global _PROBE_PREFIX
    _PROBE_PREFIX = os.urandom(8).hex()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# Both keys share the hash tag {opero:cb:<name>}: one Redis Cluster slot.
# KEYS[1]: hash {open_until (server us, 0 = closed), failures}; KEYS[2]: zset of the
# running probes, scored by the server time (us) their slot expires.

ENTER_SCRIPT = """
-- ARGV[1]: half_open_calls; ARGV[2]: probe slot lifetime (us); ARGV[3]: probe id.
-- Returns {code, failures, wait us}: 0 closed, 1 open, 2 half-open and full, 3 probe admitted.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local s = redis.call('HMGET', KEYS[1], 'open_until', 'failures')
local ou = tonumber(s[1] or '0') or 0
local failures = tonumber(s[2] or '0') or 0
if ou == 0 then return {0, failures, 0} end
if now < ou then return {1, failures, ou - now} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return {2, failures, 0} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[2]) / 1000) + 1000)
return {3, failures, 0}
"""

RECORD_SCRIPT = """
-- ARGV[1]: 's' success or 'f' failure; ARGV[2]: probe id ('' for none);
-- ARGV[3]: failures that open; ARGV[4]: reset_after (us); ARGV[5]: key lifetime (ms).
-- Returns {code, failures}: 0 nothing changed state, 1 opened, 2 closed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ou = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0') or 0
local probe = ARGV[2]
if ou ~= 0 then
  if probe == '' or redis.call('ZREM', KEYS[2], probe) == 0 then return {0, 0} end
  if now < ou then return {0, 0} end
  if ARGV[1] == 's' then
    redis.call('DEL', KEYS[1], KEYS[2])
    return {2, 0}
  end
  redis.call('HSET', KEYS[1], 'open_until', now + tonumber(ARGV[4]))
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
  return {1, tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') or 0}
end
-- Closed: a probe's late outcome (another probe closed it) is ignored.
if probe ~= '' then return {0, 0} end
if ARGV[1] == 's' then
  redis.call('DEL', KEYS[1])
  return {0, 0}
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if failures >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'open_until', now + tonumber(ARGV[4]))
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
  return {1, failures}
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
return {0, failures}
"""

READ_SCRIPT = """
-- Returns {code, failures, wait us}: 0 closed, 1 open, 2 half-open.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local s = redis.call('HMGET', KEYS[1], 'open_until', 'failures')
local ou = tonumber(s[1] or '0') or 0
local failures = tonumber(s[2] or '0') or 0
if ou == 0 then return {0, failures, 0} end
if now < ou then return {1, failures, ou - now} end
return {2, failures, 0}
"""

RESET_SCRIPT = """
-- Deletes the breaker's keys, but only when they hold a breaker's types (a hash and a
-- sorted set): a clashing key of another program is left alone. Returns keys deleted.
local n = 0
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then n = n + redis.call('DEL', KEYS[1]) end
if redis.call('TYPE', KEYS[2])['ok'] == 'zset' then n = n + redis.call('DEL', KEYS[2]) end
return n
"""

_STATES = ("closed", "open", "half_open")


class RedisState:
    """The shared state of a ``backend="redis"`` breaker (the local state decides while down).

    Args:
        breaker: The breaker it belongs to.
        url: ``redis_url``, or ``None``.
        client: ``redis_client``, or ``None``.

    """

    __slots__ = ("_clash_logged", "_outage", "breaker", "connector", "keys", "url")

    def __init__(self, breaker: CircuitBreaker, url: str | None, client: Any) -> None:
        from opero._connections.redis import RedisConnector, import_redis

        import_redis("CircuitBreaker(backend='redis')")
        self.breaker = breaker
        self.url = url
        option = "redis_client" if client is not None and url is None else "redis_url"
        self.connector: RedisConnector = RedisConnector(url, client=client, option=option)
        tag = "{opero:cb:" + (breaker.name or "") + "}"
        self.keys = (tag, tag + ":probes")
        self._outage: Outage | None = None
        self._clash_logged = False

    @property
    def outage(self) -> Outage:
        """The process-wide reachability state of this Redis."""
        if self._outage is None:
            from opero._connections.health import outage_for
            from opero._connections.redis import redact

            self._outage = outage_for(f"Redis circuit breaker at {redact(self.connector.url)}", 1.0)
        return self._outage

    def _usable(self) -> bool:
        outage = self.outage
        return not outage.down or outage.should_try()

    def _down(self, exc: Exception) -> None:
        """Record a Redis failure (logged once per outage); re-raise anything else.

        A full connection pool (back-pressure, Redis is up) is not an outage:
        the local state decides that one call, with a debug record.
        """
        import redis

        from opero._connections.redis import PoolExhausted

        if isinstance(exc, PoolExhausted):
            logger.debug("opero: %s: %s; the local state decides", self.breaker._label(), exc)
            return
        if not isinstance(exc, redis.RedisError | OSError):
            raise exc
        if isinstance(exc, redis.ResponseError) and str(exc).startswith("WRONGTYPE"):
            # Another program's value under this breaker's key: this breaker's problem,
            # not an outage of the Redis every other breaker (and cache) shares.
            if not self._clash_logged:
                self._clash_logged = True
                logger.error(
                    "opero: %s: the Redis key %s or %s holds a value of another type "
                    "(another program uses it); this breaker uses its local per-process "
                    "state until it is deleted; pick another name= or delete the key",
                    self.breaker._label(),
                    self.keys[0],
                    self.keys[1],
                )
            return
        self.outage.failed(exc, "circuit breakers use local per-process state")

    def _up(self) -> None:
        self._clash_logged = False
        outage = self.outage
        if outage.down:
            outage.succeeded()

    # script arguments

    def _enter_args(self) -> tuple[Any, ...]:
        breaker = self.breaker
        probe_id = f"{_PROBE_PREFIX}:{next(_PROBE_IDS)}"
        return (breaker.half_open_calls, int(breaker.reset_after * 1e6), probe_id)

    def _record_args(self, kind: str, probe: Probe) -> tuple[Any, ...]:
        breaker = self.breaker
        probe_id = probe if isinstance(probe, str) else ""
        life_ms = int(breaker.reset_after * 2000) + 60_000
        return (kind, probe_id, breaker.failure_threshold, int(breaker.reset_after * 1e6), life_ms)

    # decisions

    def _admitted(self, function: str, reply: Any, probe_id: str) -> Probe:
        code, failures, wait = (int(x) for x in reply)
        if code == 0:
            breaker = self.breaker
            if breaker._cause is not None or breaker._failures or breaker._open_until:
                # Closed in Redis: the failure that opened it is history, and the local
                # state of an earlier outage must not start the next one part-way open.
                with breaker._lock:
                    dropped = breaker._cause
                    breaker._close()
                del dropped
            return RESET if failures else 0
        if code == 3:
            return probe_id
        breaker = self.breaker
        if code == 1:
            self._mirror_open(wait / 1e6)
        with breaker._lock:
            cause = breaker._cause
        raise breaker._refusal(function, wait / 1e6, cause)

    def _mirror_open(self, seconds: float) -> None:
        """Keep an open circuit seen in Redis open locally too, for ``seconds``.

        If Redis then goes down (or its pool is full) the local state decides:
        it must not let calls through to a dependency the shared state knows is down.
        """
        breaker = self.breaker
        until = breaker._clock() + seconds
        with breaker._lock:
            if until > breaker._open_until:
                breaker._open_until = until
                breaker._probes.clear()
                breaker._check = True
                breaker._gate.set(True)

    def _recorded(self, reply: Any, exc: BaseException | None, probe_id: str) -> bool:
        code, failures = (int(x) for x in reply)
        breaker = self.breaker
        if code == 1 and exc is not None:
            with breaker._lock:
                dropped = breaker._cause  # freed after the lock: its __del__ may call us
                breaker._cause = exc
            del dropped
            self._mirror_open(breaker.reset_after)
            breaker._log_open(0 if probe_id else failures, exc, breaker.reset_after)
            return True
        if code == 2:
            with breaker._lock:
                dropped = breaker._cause
                breaker._close()  # closed in Redis: closed locally too
            del dropped
            logger.info("opero: %s closed: a probe call succeeded", breaker._label())
            _transition(breaker._label(), "closed")
        return False

    def enter(self, function: str) -> Probe:
        """Admit a call through Redis (the local state while Redis is down)."""
        if not self._usable():
            return self.breaker._local_enter(function)
        args = self._enter_args()
        try:
            reply = self.connector.run(lambda r: _eval(r, ENTER_SCRIPT, self.keys, args))
        except Exception as exc:
            self._down(exc)
            return self.breaker._local_enter(function)
        except BaseException:  # interrupted: the script may have taken a slot for this id
            self.release(args[2])
            raise
        self._up()
        return self._admitted(function, reply, args[2])

    async def aenter(self, function: str) -> Probe:
        """Async :meth:`enter`."""
        if not self._usable():
            return self.breaker._local_enter(function)
        args = self._enter_args()
        try:
            reply = await self.connector.arun(lambda r: _aeval(r, ENTER_SCRIPT, self.keys, args))
        except Exception as exc:
            self._down(exc)
            return self.breaker._local_enter(function)
        except BaseException:  # cancelled: the script may have taken a slot for this id
            self.release(args[2])
            raise
        self._up()
        return self._admitted(function, reply, args[2])

    def ok(self, probe: Probe) -> None:
        """Record a success (no round trip for a closed circuit without failures)."""
        if not probe:
            return
        if isinstance(probe, int) and probe > 0:  # admitted by the local state
            self.breaker._local_ok(probe)
            return
        if self.breaker._failures:  # failures counted locally while Redis was down
            self.breaker._local_ok(0)
        self._record("s", probe, None)

    async def aok(self, probe: Probe) -> None:
        """Async :meth:`ok`."""
        if not probe:
            return
        if isinstance(probe, int) and probe > 0:
            self.breaker._local_ok(probe)
            return
        if self.breaker._failures:
            self.breaker._local_ok(0)
        await self._arecord("s", probe, None)

    def failed(self, exc: BaseException, probe: Probe) -> bool:
        """Record a failure; return whether it opened the circuit."""
        if isinstance(probe, int) and probe > 0:
            return self.breaker._local_failed(exc, probe)
        return self._record("f", probe, exc)

    async def afailed(self, exc: BaseException, probe: Probe) -> bool:
        """Async :meth:`failed`."""
        if isinstance(probe, int) and probe > 0:
            return self.breaker._local_failed(exc, probe)
        return await self._arecord("f", probe, exc)

    def _record(self, kind: str, probe: Probe, exc: BaseException | None) -> bool:
        if not self._usable():
            return self._record_locally(kind, exc)
        args = self._record_args(kind, probe)
        try:
            reply = self.connector.run(lambda r: _eval(r, RECORD_SCRIPT, self.keys, args))
        except Exception as error:
            self._down(error)
            return self._record_locally(kind, exc)
        except BaseException:  # interrupted: the outcome is lost, the probe's slot is not
            if args[1]:
                self.release(args[1])
            raise
        self._up()
        return self._recorded(reply, exc, args[1])

    async def _arecord(self, kind: str, probe: Probe, exc: BaseException | None) -> bool:
        if not self._usable():
            return self._record_locally(kind, exc)
        args = self._record_args(kind, probe)
        try:
            reply = await self.connector.arun(lambda r: _aeval(r, RECORD_SCRIPT, self.keys, args))
        except Exception as error:
            self._down(error)
            return self._record_locally(kind, exc)
        except BaseException:  # interrupted: the outcome is lost, the probe's slot is not
            if args[1]:
                self.release(args[1])
            raise
        self._up()
        return self._recorded(reply, exc, args[1])

    def _record_locally(self, kind: str, exc: BaseException | None) -> bool:
        if kind == "s" or exc is None:
            self.breaker._local_ok(0)
            return False
        return self.breaker._local_failed(exc, 0)

    def release(self, probe: str) -> None:
        """Remove a cancelled or interrupted probe's slot (best effort: else it expires)."""
        if not self._usable():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            try:
                self.connector.run(lambda r: r.zrem(self.keys[1], probe))
            except Exception as exc:
                self._release_failed(exc)
            return
        task = loop.create_task(self._arelease(probe))
        _RELEASES.add(task)
        task.add_done_callback(_RELEASES.discard)

    async def _arelease(self, probe: str) -> None:
        try:
            await self.connector.arun(lambda r: r.zrem(self.keys[1], probe))
        except Exception as exc:
            self._release_failed(exc)

    def _release_failed(self, exc: Exception) -> None:
        logger.debug(
            "opero: %s: could not give back a cancelled probe's slot (%s: %s); it expires "
            "in at most %.3g s",
            self.breaker._label(),
            type(exc).__name__,
            exc,
            self.breaker.reset_after,
        )

    def read(self) -> tuple[str, int, float] | None:
        """Return ``(state, failures, retry_after)`` from Redis, or ``None`` when it is down."""
        if not self._usable():
            return None
        try:
            reply = self.connector.run(lambda r: _eval(r, READ_SCRIPT, self.keys, ()))
        except Exception as exc:
            self._down(exc)
            return None
        self._up()
        code, failures, wait = (int(x) for x in reply)
        return _STATES[code], failures, wait / 1e6

    def reset(self) -> None:
        """Delete the shared state (a closed circuit); a Redis failure is logged."""
        try:
            self.connector.run(lambda r: _eval(r, RESET_SCRIPT, self.keys, ()))
        except Exception as exc:
            self._down(exc)


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


_SHAS = {
    script: _sha(script) for script in (ENTER_SCRIPT, RECORD_SCRIPT, READ_SCRIPT, RESET_SCRIPT)
}


def _eval(client: Any, script: str, keys: tuple[str, str], args: tuple[Any, ...]) -> Any:
    """Run ``script`` by its SHA, loading it once on a server that lacks it."""
    from redis.exceptions import NoScriptError

    try:
        return client.evalsha(_SHAS[script], 2, *keys, *args)
    except NoScriptError:
        client.script_load(script)
        return client.evalsha(_SHAS[script], 2, *keys, *args)


async def _aeval(client: Any, script: str, keys: tuple[str, str], args: tuple[Any, ...]) -> Any:
    """Async :func:`_eval`."""
    from redis.exceptions import NoScriptError

    try:
        return await client.evalsha(_SHAS[script], 2, *keys, *args)
    except NoScriptError:
        await client.script_load(script)
        return await client.evalsha(_SHAS[script], 2, *keys, *args)
