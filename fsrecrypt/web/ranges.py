"""Range headers: where a player's ``Range: bytes=...`` becomes the byte span to decrypt.

Hand-written on purpose: stricter than werkzeug's ``parse_range_header``
(ASCII digits only, at most 19 of them, one range, typed 416 errors).
"""

from __future__ import annotations

import re

from fsrecrypt.errors import RangeNotSatisfiable
from fsrecrypt.numbers import NumberError, parse_int

_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)


class BadRange(RangeNotSatisfiable):
    """A Range header that is malformed, asks for several ranges, or lies outside the audio."""

    hint = "Send one range 'bytes=START-END', 'bytes=START-' or 'bytes=-SUFFIX' inside the size."


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The single byte range ``[start, end)`` a Range header asks for; None = the whole body.

    Accepted: ``bytes=A-B``, ``bytes=A-`` and ``bytes=-N`` (the last N
    bytes). A range reaching past the end is clipped to it. Multiple ranges,
    other units, malformed values and ranges starting at or past the end are
    refused (BadRange -> 416): serving multipart/byteranges would make every
    request decrypt scattered frames for no player's benefit. Positions are
    ASCII digits only (no superscripts or other scripts' digits) and at most
    19 of them, so a hostile header is a 416, never a conversion error.
    """
    if header is None:
        return None
    shown = repr(header[:60])
    value = header.strip().replace(" ", "")
    if "," in value:
        raise BadRange("multiple ranges are not supported")
    match = _RANGE_RE.fullmatch(value)
    if match is None or (not match[1] and not match[2]):
        raise BadRange(f"the Range header {shown} is not 'bytes=START-END'")
    try:
        first = parse_int(match[1]) if match[1] else None
        last = parse_int(match[2]) if match[2] else None
    except NumberError as exc:
        raise BadRange(f"the Range header {shown} has an unusable position ({exc})") from None
    if first is None:
        if not last or size == 0:
            raise BadRange(f"the suffix range {shown} selects no byte")
        return max(0, size - last), size
    if last is not None and last < first:
        raise BadRange(f"the Range header {shown} ends before it starts")
    if first >= size:
        raise BadRange(f"range start {first} is at or past the size {size}")
    end = size if last is None else min(size, last + 1)
    return first, end
