"""Event Socket text, parsed: ``text/event-plain`` bodies and what a RECORD_STOP means.

Pure functions over bytes and strings (no socket, no gevent), so the hostile
inputs (forged headers through ``%0A``, NUL and non-UTF-8 bytes, odd digits,
huge lengths) are tested without a connection. :mod:`fsrecrypt.daemon.esl`
reads the frames off the socket and hands each event body to
:func:`parse_event_body`; :mod:`fsrecrypt.daemon.events` classifies the
RECORD_STOP with :func:`classify_record_stop` and turns it into a job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_to_bytes

from fsrecrypt.errors import EventError
from fsrecrypt.numbers import NumberError, parse_int

__all__ = [
    "MAX_BODY",
    "Disposition",
    "Event",
    "RecordStop",
    "classify_record_stop",
    "db_safe_text",
    "parse_event_body",
]

# A body larger than this is refused (a broken or hostile peer must not exhaust memory).
MAX_BODY = 16 * 1024 * 1024

# --- events ---------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One parsed event: headers in wire order with decoded values, and the optional body."""

    name: str
    headers: dict[str, str]
    body: str | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        """A header's decoded value, or ``default``."""
        return self.headers.get(name, default)

    @property
    def subclass(self) -> str | None:
        """``Event-Subclass`` of a CUSTOM event."""
        return self.headers.get("Event-Subclass")


def _decode_value(raw: bytes) -> str:
    """Percent-decode one value; bytes that are not UTF-8 survive as surrogates.

    surrogateescape matches how Python decodes file names, so a latin-1
    recording path round-trips to the same bytes through ``os.fsencode``.
    """
    return unquote_to_bytes(raw).decode("utf-8", "surrogateescape")


def parse_event_body(raw: bytes) -> Event:
    """Parse a ``text/event-plain`` body: split lines first, then decode each value.

    Decoding per value is what makes an encoded newline inside a value stay
    inside that value instead of starting a forged header. The first
    occurrence of a repeated header wins (FreeSWITCH repeats a few, e.g.
    Hangup-Cause, with the same value).
    """
    if not isinstance(raw, bytes | bytearray):
        raise EventError("event body must be bytes")
    raw = bytes(raw).replace(b"\r\n", b"\n")
    head, sep, rest = raw.partition(b"\n\n")
    headers: dict[str, str] = {}
    for line in head.split(b"\n"):
        if not line:
            continue
        name_b, colon, value_b = line.partition(b":")
        name = name_b.decode("ascii", "replace").strip()
        if not colon or not name or " " in name or "\ufffd" in name:
            raise EventError(f"malformed event header line ({len(line)} bytes)")
        if value_b.startswith(b" "):
            value_b = value_b[1:]
        if name not in headers:
            headers[name] = _decode_value(value_b)
    body: str | None = None
    if "Content-Length" in headers:
        try:
            length = parse_int(headers["Content-Length"].strip(), maximum=MAX_BODY)
        except NumberError:
            raise EventError("event body Content-Length is not a number in range") from None
        if length < 0 or length > len(rest) or not sep:
            raise EventError("event body shorter than its Content-Length")
        body = rest[:length].decode("utf-8", "surrogateescape")
    name = headers.get("Event-Name")
    if not name:
        raise EventError("event without Event-Name")
    return Event(name=name, headers=headers, body=body)


# --- RECORD_STOP classification ------------------------------------------------------

Disposition = Literal["process", "discarded", "uri-failure", "remote"]
_DISCARD_CAUSES = frozenset({"empty-file", "input-too-short"})


@dataclass(frozen=True)
class RecordStop:
    """What a RECORD_STOP means for the pipeline (pure data, no I/O)."""

    core_uuid: str
    call_uuid: str | None
    channel_uuid: str | None
    path: str
    cause: str | None
    disposition: Disposition
    tenant: str | None
    consent: str | None
    record_ms: int | None
    file_size_hint: int | None
    event_seq: str | None
    event_timestamp: str | None
    sanitised: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Dedup key: a recording can follow transfers, so the call id alone is not enough."""
        return f"{self.core_uuid}:{self.path}"


def strip_variable_block(path: str) -> str:
    """Drop a leading ``{k=v,...}`` variable block (``record_session {...}/x.wav``), as
    RECORD_STOP's and the mask events' paths both carry it."""
    if path.startswith("{"):
        end = path.find("}")
        if end != -1:
            return path[end + 1 :]
    return path


# NUL and lone surrogates (what surrogateescape makes of bytes that are not
# UTF-8) are the two things a Python str can hold that PostgreSQL refuses in
# text and jsonb: a psycopg2 ValueError / UnicodeEncodeError, or a DataError.
_DB_UNSAFE = re.compile(r"[\x00\ud800-\udfff]")


def db_safe_text(value: str | None) -> str | None:
    """``value`` with NUL and undecodable bytes replaced by U+FFFD, so PostgreSQL takes it.

    Header values are caller-influenced (caller id, SIP-set channel variables)
    and decoded leniently; stored verbatim, one stray byte would make the
    INSERT fail and the recording with it. The replacement character keeps
    the rest of the value readable and shows that something was replaced.
    """
    if value is None:
        return None
    return _DB_UNSAFE.sub("\ufffd", value)


def _int_or_none(value: str | None) -> int | None:
    """An optional numeric event header: ASCII digits, bounded; anything else is absent."""
    try:
        return parse_int(value.strip()) if value else None
    except NumberError:
        return None


def classify_record_stop(
    event: Event,
    tenant_header: str = "variable_fsrecrypt_tenant",
    consent_header: str = "variable_recording_consent",
) -> RecordStop:
    """Turn a RECORD_STOP into a :class:`RecordStop` with its disposition.

    ``discarded``: FreeSWITCH deleted the file (empty-file, input-too-short,
    or RECORD_DISCARDED), even though ``variable_record_file_size`` may still
    name a size. ``uri-failure``: the event fires before the file is closed,
    so it must never be read. ``remote``: a URL (``http://``, ``s3://``), not
    a local file. Everything else is ``process``.
    """
    if event.name != "RECORD_STOP":
        raise EventError(f"not a RECORD_STOP event: {event.name}")
    raw_path = event.get("Record-File-Path")
    if not raw_path:
        raise EventError("RECORD_STOP without Record-File-Path")
    core_uuid = event.get("Core-UUID")
    if not core_uuid:
        raise EventError("RECORD_STOP without Core-UUID")
    path = strip_variable_block(raw_path)
    if not path:
        raise EventError("RECORD_STOP with an empty Record-File-Path")
    cause = event.get("Record-Completion-Cause") or event.get("variable_record_completion_cause")
    discarded_var = (event.get("variable_RECORD_DISCARDED") or "").lower() == "true"
    disposition: Disposition
    if cause == "uri-failure":
        disposition = "uri-failure"
    elif cause in _DISCARD_CAUSES or discarded_var:
        disposition = "discarded"
    elif "://" in path:
        disposition = "remote"
    else:
        disposition = "process"
    # Every text field below ends up in PostgreSQL; the path is left as
    # decoded (it must name the file byte for byte) and vetted by the daemon.
    raw_fields: dict[str, str | None] = {
        "core_uuid": core_uuid,
        "call_uuid": event.get("Channel-Call-UUID") or event.get("variable_call_uuid"),
        "channel_uuid": event.get("Unique-ID"),
        "cause": cause,
        "tenant": event.get(tenant_header) or None,
        "consent": event.get(consent_header) or None,
        "event_seq": event.get("Event-Sequence"),
        "event_timestamp": event.get("Event-Date-Timestamp"),
    }
    clean = {name: db_safe_text(value) for name, value in raw_fields.items()}
    sanitised = tuple(name for name in raw_fields if clean[name] != raw_fields[name])
    return RecordStop(
        core_uuid=clean["core_uuid"] or "",
        call_uuid=clean["call_uuid"],
        channel_uuid=clean["channel_uuid"],
        path=path,
        cause=clean["cause"],
        disposition=disposition,
        tenant=clean["tenant"],
        consent=clean["consent"],
        record_ms=_int_or_none(event.get("variable_record_ms")),
        file_size_hint=_int_or_none(event.get("variable_record_file_size")),
        event_seq=clean["event_seq"],
        event_timestamp=clean["event_timestamp"],
        sanitised=sanitised,
    )
