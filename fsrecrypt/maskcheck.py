"""Is a recording's announced mask digital silence in the audio? Checked in the encrypting read.

PCI DSS 3.3.1: no card data may be kept after authorisation, so agents
pause (mask) the recording while a caller reads a card number out.
FreeSWITCH writes a masked span as digital silence (every sample 0) and the
file keeps its length. The mask events carry wall-clock times, but the audio
can sit earlier than they say (media starts flowing after RECORD_START: the
``uuid_record`` capture shows the span ~0.5 s early), so the event times are
where to *look*, and the silent run found in the audio is what is stored.

Pure: no I/O of its own. :class:`ScanningReader` wraps the plaintext stream
the encryptor reads, so the check sees every byte of that one read (no second
pass over a file that could change in between), and :class:`SilenceScanner`
keeps memory constant: per announced span, only the best silent run so far.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = [
    "AnnouncedSpan",
    "MaskVerdict",
    "ScanningReader",
    "SilenceScanner",
    "announced_spans",
]

# One FreeSWITCH media frame: shorter zero runs are ordinary audio.
MIN_RUN_MS = 20
# How much of the header we buffer looking for the "data" chunk.
MAX_HEADER = 64 * 1024
_PCM, _EXTENSIBLE = 1, 0xFFFE


@dataclass(frozen=True)
class AnnouncedSpan:
    """A masked span as the events tell it, in ms from RECORD_START (``end_ms`` None: to EOF)."""

    start_ms: int
    end_ms: int | None
    via: str


def announced_spans(
    started_us: int, stopped_us: int | None, marks: Sequence[tuple[str, str, int]]
) -> list[AnnouncedSpan]:
    """The masked spans from the marks in arrival order (the order FreeSWITCH ran them).

    A second mask while masked and an unmask while not masked change
    nothing (FreeSWITCH sets and clears one flag). Times are clamped into
    [RECORD_START, RECORD_STOP]: an API event is stamped when the command
    started, which can be a few ms before RECORD_START. A span still masked
    at the end runs to the end of the file; a zero-length one is dropped.
    """
    end_us = stopped_us if stopped_us is not None and stopped_us >= started_us else None
    spans: list[AnnouncedSpan] = []
    open_at: int | None = None
    open_via = ""
    for kind, via, at_us in marks:
        at = max(at_us, started_us)
        if end_us is not None:
            at = min(at, end_us)
        ms = (at - started_us) // 1000
        if kind == "mask" and open_at is None:
            open_at, open_via = ms, via
        elif kind == "unmask" and open_at is not None:
            if ms > open_at:
                spans.append(AnnouncedSpan(open_at, ms, open_via))
            open_at = None
    if open_at is not None:
        spans.append(AnnouncedSpan(open_at, None, open_via))
    return _merged(spans)


def _merged(spans: list[AnnouncedSpan]) -> list[AnnouncedSpan]:
    """Overlapping or touching spans as one (a replayed or repeated mask/unmask pair)."""
    out: list[AnnouncedSpan] = []
    for span in sorted(spans, key=lambda s: (s.start_ms, s.end_ms is None, s.end_ms or 0)):
        last = out[-1] if out else None
        if last is not None and (last.end_ms is None or span.start_ms <= last.end_ms):
            end = None if None in (last.end_ms, span.end_ms) else max(last.end_ms, span.end_ms)  # type: ignore[type-var]
            out[-1] = AnnouncedSpan(last.start_ms, end, last.via)
        else:
            out.append(span)
    return out


@dataclass(frozen=True)
class MaskVerdict:
    """The spans as checked (JSON-ready dicts) and whether every one is silent in the audio."""

    spans: list[dict[str, Any]]
    verified: bool
    reason: str | None = None


@dataclass
class _Candidate:
    start: int = -1  # frames
    end: int = -1
    overlap: int = -1


class SilenceScanner:
    """Feed it the file's bytes in order; :meth:`finish` tells which spans are silent.

    ``wall_ms``: RECORD_START to RECORD_STOP (None if no stop was seen).
    ``tolerance_ms``: how far the audio may sit from the announced times.
    """

    def __init__(
        self,
        spans: Sequence[AnnouncedSpan],
        wall_ms: int | None,
        tolerance_ms: int = 500,
        flooded: bool = False,
    ) -> None:
        self.spans = sorted(spans, key=lambda s: s.start_ms)
        self._starts = [s.start_ms for s in self.spans]
        self.wall_ms = wall_ms
        self.tol = tolerance_ms
        self.flooded = flooded
        self._best = [_Candidate() for _ in self.spans]
        self._head = bytearray()
        self._problem: str | None = None
        self._frame = 0  # bytes per sample frame (all channels)
        self._rate = 0
        self._data_left: int | None = None  # bytes of the data chunk still to come
        self._pos = 0  # bytes of the data chunk seen
        self._run_start: int | None = None  # byte offset of the zero run in progress
        self._lag_ms = 0
        self._min_run = 0  # bytes

    # --- input -------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the file, in order."""
        if self._problem is not None or not self.spans:
            return
        if self._data_left is None:
            self._head += chunk
            self._parse_header()
            return
        self._scan(chunk)

    def _parse_header(self) -> None:
        head = bytes(self._head)
        if len(head) >= 12 and (head[:4] != b"RIFF" or head[8:12] != b"WAVE"):
            self._problem = "not a WAV file: the audio cannot be checked"
            return
        pos, fmt = 12, None
        while pos + 8 <= len(head):
            cid, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
            if cid == b"data":
                if fmt is None:
                    self._problem = "WAV data before its format chunk"
                    return
                self._start_data(fmt, size, head[pos + 8 :])
                return
            if cid == b"fmt " and pos + 8 + 16 <= len(head):
                fmt = struct.unpack_from("<HHIIHH", head, pos + 8)
            elif cid == b"fmt ":
                break  # wait for the rest of the format chunk
            pos += 8 + size + (size & 1)
        if len(head) > MAX_HEADER:
            self._problem = "no WAV data chunk in the first 64 KiB"

    def _start_data(self, fmt: tuple[int, ...], size: int, rest: bytes) -> None:
        tag, channels, rate, _byte_rate, align, bits = fmt
        if tag not in (_PCM, _EXTENSIBLE) or bits < 16 or bits % 8 or channels < 1 or rate < 1:
            self._problem = (
                f"audio format {tag}/{bits}-bit is not signed PCM: silence cannot be checked"
            )
            return
        self._frame = max(align, channels * bits // 8)
        self._rate = rate
        self._head = bytearray()
        self._data_left = size
        data_ms = size // self._frame * 1000 // rate
        if self.wall_ms is not None:
            self._lag_ms = max(0, self.wall_ms - data_ms)
        self._min_run = max(1, rate * MIN_RUN_MS // 1000) * self._frame
        if rest:
            self._scan(rest)

    def _scan(self, chunk: bytes) -> None:
        left = self._data_left or 0
        if len(chunk) > left:
            chunk = chunk[:left]  # chunks after the data (LIST...) are not audio
        if not chunk:
            return
        base = self._pos
        self._pos += len(chunk)
        self._data_left = left - len(chunk)
        pos = 0
        if self._run_start is not None:
            nonzero = _first_nonzero(chunk, 0)
            if nonzero is None:
                return
            self._emit(self._run_start, base + nonzero)
            self._run_start = None
            pos = nonzero
        block = b"\x00" * self._min_run
        while True:
            at = chunk.find(block, pos)
            if at == -1:
                break
            nonzero = _first_nonzero(chunk, at + len(block))
            if nonzero is None:
                self._run_start = base + at
                return
            self._emit(base + at, base + nonzero)
            pos = nonzero
        # Zeros at the end may begin a run that goes on in the next chunk.
        tail = len(chunk) - len(chunk.rstrip(b"\x00"))
        if tail:
            self._run_start = base + len(chunk) - tail

    # --- matching ----------------------------------------------------------------

    def _ms(self, frames: int) -> int:
        return frames * 1000 // self._rate

    def _emit(self, start_byte: int, end_byte: int, at_eof: bool = False) -> None:
        """A run of zero bytes: whole zero frames inside it, matched against the spans."""
        first = -(-start_byte // self._frame)
        last = end_byte // self._frame
        if (last - first) * self._frame < self._min_run:
            return
        start_ms, end_ms = self._ms(first), self._ms(last)
        # Spans whose start window can contain this run's start, and up to its end.
        i = bisect.bisect_left(self._starts, start_ms - self.tol)
        while i < len(self.spans):
            span = self.spans[i]
            if span.start_ms - self._lag_ms - self.tol > end_ms:
                break
            self._consider(i, span, first, last, start_ms, end_ms, at_eof)
            i += 1

    def _consider(
        self,
        i: int,
        span: AnnouncedSpan,
        first: int,
        last: int,
        start_ms: int,
        end_ms: int,
        at_eof: bool,
    ) -> None:
        tol, lag = self.tol, self._lag_ms
        if start_ms > span.start_ms + tol:
            return  # silence only began well after the mask
        if span.end_ms is None:
            if not at_eof:
                return  # masked to the end: the silence must reach it
            duration = max(0, end_ms - span.start_ms)
        else:
            if end_ms < span.end_ms - lag - tol:
                return  # silence ended well before the unmask
            duration = span.end_ms - span.start_ms
        if end_ms - start_ms < max(duration - tol, duration // 2):
            return
        lo = max(start_ms, span.start_ms - lag - tol)
        hi = end_ms if span.end_ms is None else min(end_ms, span.end_ms + tol)
        overlap = min(hi, span.end_ms if span.end_ms is not None else end_ms) - max(
            lo, span.start_ms - lag
        )
        best = self._best[i]
        if overlap > best.overlap:
            best.start, best.end, best.overlap = lo, hi, overlap

    # --- result ------------------------------------------------------------------

    def finish(self) -> MaskVerdict:
        """The verdict once every byte was fed (call once, after the last chunk)."""
        if self._problem is None and self.spans and self._data_left is None:
            self._problem = "the file ended before its WAV data chunk"
        if self._problem is None and self._run_start is not None:
            self._emit(self._run_start, self._pos, at_eof=True)
            self._run_start = None
        out: list[dict[str, Any]] = []
        for span, best in zip(self.spans, self._best, strict=True):
            found = best.overlap >= 0 and self._problem is None
            out.append(
                {
                    "announced_start_ms": span.start_ms,
                    "announced_end_ms": span.end_ms,
                    "open_at_stop": span.end_ms is None,
                    "via": span.via,
                    "start_ms": best.start if found else None,
                    "end_ms": best.end if found else None,
                    "silent": found,
                }
            )
        reason = self._problem
        if reason is None and self.flooded:
            reason = "more mask events than fsrecrypt keeps: the spans are incomplete"
        if reason is None and not all(s["silent"] for s in out):
            reason = "a masked span is not digital silence in the audio"
        return MaskVerdict(out, reason is None, reason)


def _first_nonzero(chunk: bytes, pos: int) -> int | None:
    """Index of the first non-zero byte at or after ``pos``, or None.

    Comparisons against zero blocks (memcmp) halving the range: a silent
    64 KiB chunk costs one comparison, where a byte loop (regex, lstrip)
    costs ~30x the encryption of it.
    """
    lo, hi = pos, len(chunk)
    if lo >= hi or chunk[lo:hi] == bytes(hi - lo):
        return None
    while hi - lo > 64:  # invariant: chunk[pos:lo] is zero, a non-zero byte is in [lo, hi)
        mid = (lo + hi) // 2
        if chunk[lo:mid] == bytes(mid - lo):
            lo = mid
        else:
            hi = mid
    return next(i for i in range(lo, hi) if chunk[i])


class ScanningReader:
    """Wraps the plaintext stream: every byte the encryptor reads also goes to the scanner."""

    def __init__(self, source: BinaryIO | Any, scanner: SilenceScanner) -> None:
        self._source = source
        self.scanner = scanner

    def readinto(self, buf: Any) -> int:
        n = self._source.readinto(buf)
        if n:
            with memoryview(buf) as view:
                self.scanner.feed(bytes(view[:n]))
        return n or 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._source.read(size)
        self.scanner.feed(data)
        return data
