r"""Turning cached values into bytes and back, optionally signed with HMAC-SHA256.

Used by the cross-process backends (Redis, disk). A :class:`Codec` pairs a
serializer (``"pickle"``, ``"json"`` or any ``(dumps, loads)`` pair) with an
optional secret:

* without a secret, the stored bytes are the serializer's output, unchanged;
* with a secret (``secret=`` or the ``OPERO_CACHE_SECRET`` environment
  variable, read at first use), the stored bytes are
  ``b"opero-hmac1:" + HMAC-SHA256(secret, key + b"\\0" + payload) + payload``.
  The MAC covers the entry's full key, so a value signed for one call cannot be
  replayed under another key. It is checked with :func:`hmac.compare_digest`
  *before* the payload reaches the serializer: a value that fails the check is
  never unpickled.

Security note: ``pickle.loads`` runs code chosen by whoever wrote the bytes. An
unsigned pickle cache must only be used with a store (a Redis server, a cache
directory) that nobody else can write to. Set a secret, or use ``"json"``,
whenever that is not certain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
from collections.abc import Callable
from typing import Any

from opero.errors import ConfigurationError

__all__ = ["Codec", "SerializerSpec", "VerificationError", "resolve_serializer"]

SerializerSpec = str | tuple[Callable[[Any], Any], Callable[[Any], Any]]
"""``"pickle"``, ``"json"`` or a ``(dumps, loads)`` pair."""

SECRET_ENV = "OPERO_CACHE_SECRET"
_MAGIC = b"opero-hmac1:"
_MAC_SIZE = hashlib.sha256().digest_size
_HEADER = len(_MAGIC) + _MAC_SIZE


class VerificationError(ValueError):
    """A stored value is not signed, or its signature does not match (never deserialized)."""


def _pickle_dumps(value: Any) -> bytes:
    """Pickle with the highest protocol (fastest to load)."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _json_dumps(value: Any) -> bytes:
    """Encode as compact UTF-8 JSON; raise ``TypeError`` for what JSON cannot hold."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode()


def _json_loads(data: bytes) -> Any:
    """Decode UTF-8 JSON."""
    return json.loads(data)


def resolve_serializer(
    serializer: Any,
) -> tuple[str, Callable[[Any], bytes], Callable[[bytes], Any]]:
    """Return ``(name, dumps, loads)`` for a serializer option.

    Args:
        serializer: ``"pickle"`` (default of the backends), ``"json"``, or a
            ``(dumps, loads)`` pair of callables where ``dumps(value)`` returns
            ``bytes`` (or ``str``, encoded as UTF-8) and ``loads(bytes)``
            returns the value.

    Raises:
        ConfigurationError: Unknown name, or not a pair of callables.

    """
    if isinstance(serializer, str):
        if serializer == "pickle":
            return "pickle", _pickle_dumps, pickle.loads
        if serializer == "json":
            return "json", _json_dumps, _json_loads
        raise ConfigurationError(
            f"cache_serializer={serializer!r} is not a known serializer; use 'pickle', "
            "'json' or a (dumps, loads) pair of callables"
        )
    if (
        isinstance(serializer, tuple | list)
        and len(serializer) == 2
        and callable(serializer[0])
        and callable(serializer[1])
    ):
        user_dumps, user_loads = serializer

        def dumps(value: Any) -> bytes:
            """Call the user's dumps and accept ``str`` output as UTF-8."""
            data = user_dumps(value)
            if isinstance(data, str):
                return data.encode()
            if isinstance(data, bytes | bytearray | memoryview):
                return bytes(data)
            raise TypeError(
                f"cache_serializer dumps returned {type(data).__name__}; it must return bytes"
            )

        name = getattr(user_dumps, "__qualname__", type(user_dumps).__name__)
        return f"custom:{name}", dumps, user_loads
    raise ConfigurationError(
        f"cache_serializer={serializer!r} is not valid; use 'pickle', 'json' or a "
        "(dumps, loads) pair of callables"
    )


def _resolve_secret(secret: str | bytes | None) -> bytes | None:
    """Return the secret as bytes (``OPERO_CACHE_SECRET`` when ``secret`` is ``None``)."""
    if secret is None:
        env = os.environ.get(SECRET_ENV)
        return env.encode() if env else None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def _mac(secret: bytes, key: str, payload: bytes) -> bytes:
    """Return HMAC-SHA256 over ``key``, a NUL separator and ``payload``."""
    mac = hmac.new(secret, key.encode(), hashlib.sha256)
    mac.update(b"\0")
    mac.update(payload)
    return mac.digest()


class Codec:
    """Encodes values to bytes and back, signing and verifying them when a secret is set.

    Args:
        serializer: ``"pickle"`` (default), ``"json"`` or a ``(dumps, loads)`` pair.
        secret: HMAC key (``str`` or ``bytes``). ``None`` (default) reads
            ``OPERO_CACHE_SECRET`` at first use; an empty value means unsigned.

    Raises:
        ConfigurationError: Unknown serializer, or a secret that is not ``str``/``bytes``.

    """

    __slots__ = ("_dumps", "_explicit_secret", "_loads", "_resolved", "_secret", "name")

    def __init__(self, serializer: Any = "pickle", secret: str | bytes | None = None) -> None:
        self.name, self._dumps, self._loads = resolve_serializer(serializer)
        if secret is not None and not isinstance(secret, str | bytes):
            raise ConfigurationError(
                f"cache_secret must be str or bytes, got {type(secret).__name__}; "
                "pass the HMAC key as text or bytes (or set OPERO_CACHE_SECRET)"
            )
        if secret is not None and not secret:
            raise ConfigurationError(
                "cache_secret is empty; pass a non-empty key, or None to read OPERO_CACHE_SECRET"
            )
        self._explicit_secret = secret
        self._secret: bytes | None = None
        self._resolved = False

    @property
    def secret(self) -> bytes | None:
        """The HMAC key in use (read from the environment at first access), or ``None``."""
        if not self._resolved:
            self._secret = _resolve_secret(self._explicit_secret)
            self._resolved = True
        return self._secret

    @property
    def signed(self) -> bool:
        """Whether values are signed and verified."""
        return self.secret is not None

    def encode(self, key: str, value: Any) -> bytes:
        """Serialize ``value`` (and sign it for ``key`` when a secret is set).

        Raises:
            Exception: Whatever the serializer raises for a value it cannot hold.

        """
        payload = self._dumps(value)
        secret = self.secret
        if secret is None:
            return payload
        return _MAGIC + _mac(secret, key, payload) + payload

    def decode(self, key: str, data: bytes) -> Any:
        """Verify (when a secret is set) then deserialize stored bytes.

        Raises:
            VerificationError: Signed mode and the value is unsigned or its MAC
                does not match; the payload was not deserialized.
            Exception: Whatever the serializer raises for corrupt bytes.

        """
        secret = self.secret
        if secret is None:
            return self._loads(data)
        if len(data) < _HEADER or not data.startswith(_MAGIC):
            raise VerificationError("value is not signed")
        payload = data[_HEADER:]
        if not hmac.compare_digest(_mac(secret, key, payload), data[len(_MAGIC) : _HEADER]):
            raise VerificationError("HMAC signature does not match")
        return self._loads(payload)
