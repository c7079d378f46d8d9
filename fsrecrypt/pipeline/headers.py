"""Object headers: read with one small ranged request, and cached once they verified."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from fsrecrypt import format as esdk
from fsrecrypt.errors import TruncatedMessage

if TYPE_CHECKING:
    from fsrecrypt.store import ObjectInfo, ObjectStore

HEADER_PROBE = 4096
"""Bytes of an object read first for its header (grown when the header is larger)."""


def read_object_header(store: ObjectStore, key: str, object_size: int) -> esdk.Header:
    """Fetch just the header: a small ranged read, grown if the header is larger."""
    probe = min(HEADER_PROBE, object_size)
    while True:
        data = store.read_bytes(key, 0, probe)
        try:
            return esdk.parse_header(data)
        except TruncatedMessage:
            if probe >= object_size:
                raise
            probe = min(object_size, probe * 4)


class HeaderCache:
    """Recently verified object headers, so a player's seeks skip one request each.

    Only a header that verified (key commitment and header tag, under the
    data key unwrapped from the database's copy) is put here, and an entry
    is used only while the object's identity from the store's HEAD (size,
    etag, version, local stamp) is the one it was read under: a rewritten,
    tampered or restored object misses the cache and has its header read
    and verified again at once. A read that fails in any way drops the entry
    (``drop``), so a bad object is never served from memory. Entries hold
    only the wrapped data key and expire after ``ttl`` seconds, so even that
    does not linger after an erasure; every read still unwraps the key from
    the database's copy and checks the row's status first.
    """

    def __init__(self, size: int = 1024, ttl: float = 300.0) -> None:
        self._entries: OrderedDict[str, tuple[float, tuple[Any, ...], bytes]] = OrderedDict()
        self._size = size
        self._ttl = ttl
        self._lock = threading.Lock()

    def get(self, key: str, identity: tuple[Any, ...]) -> esdk.Header | None:
        """The verified header cached for ``key`` if the object is still ``identity``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if time.monotonic() - entry[0] > self._ttl or entry[1] != identity:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
        return esdk.parse_header(entry[2])

    def put(self, key: str, identity: tuple[Any, ...], header: esdk.Header) -> None:
        """Remember ``header``; call only once it verified with the recording's data key."""
        with self._lock:
            self._entries[key] = (time.monotonic(), identity, header.raw)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        """Forget ``key``: a read of that object failed."""
        with self._lock:
            self._entries.pop(key, None)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries


def object_identity(info: ObjectInfo) -> tuple[Any, ...]:
    """What must be unchanged for a cached header to still be the object's header."""
    return (info.size, info.etag, info.version_id, info.stamp)
