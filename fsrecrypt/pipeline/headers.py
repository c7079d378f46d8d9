"""Object headers: read with one small ranged request, and cached once they verified."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

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


def read_described_header(store: ObjectStore, key: str) -> tuple[esdk.Header, ObjectInfo]:
    """The header and the identity of the object it was read from, in one request
    where the store can (``ObjectStore.read_described``): a player's first seek
    into a recording then costs two requests (header, frames), not three."""
    data, info = store.read_described(key, 0, HEADER_PROBE)
    probe = HEADER_PROBE
    while True:
        try:
            return esdk.parse_header(data), info
        except TruncatedMessage:
            if probe >= info.size:
                raise
            probe = min(info.size, probe * 4)
            data = b"".join(store.get_range(key, 0, probe, expect=info))


class HeaderCache:
    """Recently verified object headers, so a player's seeks cost one request each.

    Only a header that verified (key commitment and header tag, under the
    data key unwrapped from the database's copy) is put here, together with
    the object's identity it was read under (``ObjectInfo``: size, etag,
    local stamp). A read that uses the entry is made conditional on that
    identity (``get_range(..., expect=info)``: S3 checks ``If-Match`` on the
    GET itself, the local store ``fstat``s the file it opened), so a
    rewritten, tampered or restored object is noticed by the read, without a
    HEAD before it, and is read and verified again at once. A read that fails
    in any way drops the entry (``drop``), so a bad object is never served
    from memory. Entries hold only the header (whose data key is wrapped) and
    expire after ``ttl`` seconds; every read still checks the row's status and
    unwraps the key from the database's copy.
    """

    def __init__(self, size: int = 1024, ttl: float = 300.0) -> None:
        self._entries: OrderedDict[str, tuple[float, ObjectInfo, bytes]] = OrderedDict()
        self._size = size
        self._ttl = ttl
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[ObjectInfo, esdk.Header] | None:
        """The verified header cached for ``key`` and the identity it was read under."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if time.monotonic() - entry[0] > self._ttl:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
        return entry[1], esdk.parse_header(entry[2])

    def put(self, key: str, info: ObjectInfo, header: esdk.Header) -> None:
        """Remember ``header``; call only once it verified with the recording's data key."""
        with self._lock:
            self._entries[key] = (time.monotonic(), info, header.raw)
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
