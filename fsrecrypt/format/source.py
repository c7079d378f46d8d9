"""Exact reads over the byte sources handed to the format code.

The format package opens nothing itself: callers hand it a blocking
file-like object (a local file, an S3 body, a socket) or an iterable of
chunks (a store's ranged GET). These helpers turn short reads into either
the requested bytes or a typed :class:`~fsrecrypt.errors.TruncatedMessage`,
so the parsers never see a partial field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from fsrecrypt.errors import (
    InputFileError,
    TrailingData,
    TruncatedMessage,
)
from fsrecrypt.format.constants import (
    _NON_FRAMED_READ_CHUNK,
)


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _ChunkSource:
    """File-like view (readinto/read) of an iterable of byte chunks.

    Lets random-access decryption reuse the streaming frame reader whatever
    chunking the store's ranged GET produced.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._cur = memoryview(b"")
        self._pos = 0

    def _advance(self) -> bool:
        while self._pos >= len(self._cur):
            nxt = next(self._chunks, None)
            if nxt is None:
                return False
            self._cur = memoryview(nxt).cast("B")
            self._pos = 0
        return True

    def readinto(self, buf: memoryview | bytearray) -> int:
        if not self._advance():
            return 0
        n = min(len(buf), len(self._cur) - self._pos)
        buf[:n] = self._cur[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        if not self._advance():
            return b""
        if n < 0:
            n = len(self._cur) - self._pos
        n = min(n, len(self._cur) - self._pos)
        out = bytes(self._cur[self._pos : self._pos + n])
        self._pos += n
        return out


class _Input:
    """Exact reads over a blocking byte stream (``readinto`` when it has one).

    Short reads are normal for sockets and HTTP bodies, so every read loops;
    end of input before the requested count is a truncated message.
    """

    def __init__(self, source: _Readable) -> None:
        self._source = source
        self._readinto = getattr(source, "readinto", None)

    def read_exact(self, n: int, what: str) -> bytes:
        if n == 0:
            return b""
        data = self._source.read(n)
        if data is None:
            raise InputFileError("source returned no data (non-blocking streams are not supported)")
        if len(data) == n:
            return bytes(data)
        parts = [data]
        got = len(data)
        while got < n:
            more = self._source.read(n - got)
            if more is None:
                raise InputFileError(
                    "source returned no data (non-blocking streams are not supported)"
                )
            if not more:
                raise TruncatedMessage(f"message ends inside {what}")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def readinto_exact(self, view: memoryview, what: str) -> None:
        if self._readinto is None:
            view[:] = self.read_exact(len(view), what)
            return
        got = 0
        total = len(view)
        while got < total:
            n = self._readinto(view[got:])
            if n is None:
                raise InputFileError(
                    "source returned no data (non-blocking streams are not supported)"
                )
            if n == 0:
                raise TruncatedMessage(f"message ends inside {what}")
            got += n

    def read_large(self, n: int, what: str) -> bytes:
        """Read ``n`` bytes in bounded steps so a lying length cannot force a huge allocation."""
        parts = []
        left = n
        while left:
            step = min(left, _NON_FRAMED_READ_CHUNK)
            parts.append(self.read_exact(step, what))
            left -= step
        return b"".join(parts)

    def expect_end(self, message_id: bytes) -> None:
        extra = self._source.read(1)
        if extra:
            raise TrailingData(f"bytes follow the final frame of message {message_id.hex()}")


def _fill(source: _Readable, readinto: Callable | None, view: memoryview) -> int:
    """Fill ``view`` from a blocking stream; return the count (short only at end of input)."""
    got = 0
    total = len(view)
    if readinto is not None:
        while got < total:
            n = readinto(view[got:])
            if n is None:
                raise InputFileError(
                    "source returned no data (non-blocking streams are not supported)"
                )
            if n == 0:
                break
            got += n
        return got
    while got < total:
        data = source.read(total - got)
        if data is None:
            raise InputFileError("source returned no data (non-blocking streams are not supported)")
        if not data:
            break
        view[got : got + len(data)] = data
        got += len(data)
    return got
