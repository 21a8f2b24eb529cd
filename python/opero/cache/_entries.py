"""What the Redis and disk caches share: turning values into signed bytes and back.

Both store bytes from a :class:`~opero.cache._serializers.Codec` under a full key
``{namespace}:{qualname}:{digest}``, where ``%`` and ``:`` inside the namespace
and the qualname are written ``%25`` and ``%3A`` (:func:`entry_prefix`): the
``:`` separators are then the only ones, so namespace ``"prices"`` never
matches the keys of namespace ``"prices:eu"``. Reading counts hits and misses; a value
that fails verification, is corrupt or was not written by opero is a miss and a
warning, never an exception in the caller and never unpickled. A result the
serializer cannot encode is not cached, logged once per type.
"""

from __future__ import annotations

from typing import Any

from opero._connections.health import logger
from opero.cache._base import MISS, CacheInfo
from opero.cache._serializers import Codec, VerificationError

__all__ = ["CodecEntries", "entry_prefix", "escape_part"]


def escape_part(text: str) -> str:
    """Return ``text`` with ``%`` and ``:`` percent-encoded (a key part without separators)."""
    if "%" in text or ":" in text:
        return text.replace("%", "%25").replace(":", "%3A")
    return text


def entry_prefix(namespace: str, qualname: str) -> str:
    """Return ``{namespace}:{qualname}:`` with both parts escaped, the start of every full key.

    Args:
        namespace: ``cache_namespace``.
        qualname: The function's identity (``module.qualname``, plus a code
            digest for local functions and lambdas).

    """
    return f"{escape_part(namespace)}:{escape_part(qualname)}:"


class CodecEntries:
    """Counters and codec handling of one function's entries in a byte store.

    Args:
        codec: Serializer (and signer) of the values.
        label: The store's name in log messages (``"Redis"``, ``"disk"``).
        namespace: ``cache_namespace``.
        qualname: The function's identity; with ``namespace``, the key prefix
            (:func:`entry_prefix`).

    """

    __slots__ = (
        "__weakref__",
        "_unserializable",
        "codec",
        "hits",
        "label",
        "misses",
        "namespace",
        "prefix",
    )

    def __init__(self, codec: Codec, label: str, namespace: str, qualname: str) -> None:
        self.codec = codec
        self.label = label
        self.namespace = namespace
        self.prefix = entry_prefix(namespace, qualname)
        self.hits = 0
        self.misses = 0
        # Names, not classes: a class made per call (make_dataclass, a local
        # namedtuple) would otherwise be kept alive, and warned about, once per call.
        self._unserializable: set[str] = set()

    def miss(self) -> Any:
        """Count a miss and return :data:`MISS`."""
        self.misses += 1
        return MISS

    def decode(self, key: str, data: Any) -> Any:
        """Turn the bytes stored under ``key`` into a value; a bad value is a logged miss."""
        if data is None:
            return self.miss()
        if not isinstance(data, bytes):
            logger.warning(
                "opero: %s cache entry %r was not written by opero (%s); treated as a miss",
                self.label,
                key,
                type(data).__name__,
            )
            return self.miss()
        try:
            value = self.codec.decode(key, data)
        except VerificationError as exc:
            logger.warning(
                "opero: %s cache entry %r failed verification (%s); treated as a miss "
                "and not deserialized",
                self.label,
                key,
                exc,
            )
            return self.miss()
        except Exception as exc:
            logger.warning(
                "opero: %s cache entry %r is corrupt or not written by opero (%s: %s); "
                "treated as a miss",
                self.label,
                key,
                type(exc).__name__,
                exc,
            )
            return self.miss()
        self.hits += 1
        return value

    def encode(self, key: str, value: Any) -> bytes | None:
        """Serialize a value for ``key``, or log once per type name and return ``None``."""
        try:
            return self.codec.encode(key, value)
        except Exception as exc:
            kind = type(value)
            name = f"{kind.__module__}.{kind.__qualname__}"
            if name not in self._unserializable:
                self._unserializable.add(name)
                logger.warning(
                    "opero: a %s result of %s is not cached: the %s serializer cannot "
                    "encode it (%s: %s); logged once per type name",
                    kind.__qualname__,
                    self.prefix[:-1],
                    self.codec.name,
                    type(exc).__name__,
                    str(exc),  # not the exception: its frames hold the value (and its class)
                )
            return None

    def info(self) -> CacheInfo:
        """Return this process's hit/miss counters (``currsize`` is -1: not counted)."""
        return CacheInfo(self.hits, self.misses, None, -1)
