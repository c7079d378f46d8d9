"""The events that delimit a recording and announce its masked (PCI-paused) spans, parsed.

Pure functions over :class:`~fsrecrypt.daemon.eslparse.Event` (no socket, no
database), so hostile values are tested without either. What FreeSWITCH
1.10 sends (``tests/fixtures/freeswitch/mask/``):

* ``RECORD_START``: the recording's time zero; channel ``Unique-ID``, path
  ``Record-File-Path``.
* ``CHANNEL_EXECUTE`` with ``Application: record_session_mask`` or
  ``record_session_unmask`` and ``Application-Data: <path>`` (the dialplan).
* ``API`` with ``API-Command: uuid_record`` and ``API-Command-Argument:
  <uuid> mask|unmask <path>`` (an API client). The channel is named only in
  the argument, and FreeSWITCH fires the event whether or not the command
  worked, so anyone with API access can make one up: the daemon acts on it
  only for a recording it saw start.

Every time is ``Event-Date-Timestamp`` (microseconds since the epoch): for
an API command, the moment it was started (the event itself arrives after
the command ran).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fsrecrypt.daemon.eslparse import Event, db_safe_text, strip_variable_block
from fsrecrypt.errors import EventError
from fsrecrypt.numbers import NumberError, parse_int

__all__ = ["MAX_PATH", "MaskKind", "RecordMark", "classify_mark", "event_time_us"]

MaskKind = Literal["start", "mask", "unmask"]
MaskVia = Literal["record", "dialplan", "api"]

# Bounds on what is stored from an event: a channel id, a path.
MAX_CHANNEL = 128
MAX_PATH = 4096
# 2001-09-09 .. 2286-11-20 in microseconds: anything outside is not a clock.
_MIN_TS = 10**15
_MAX_TS = 10**16 - 1
_CHANNEL = re.compile(rf"[\x21-\x7e]{{1,{MAX_CHANNEL}}}")
_APPS = {"record_session_mask": "mask", "record_session_unmask": "unmask"}


@dataclass(frozen=True)
class RecordMark:
    """One mark on a recording's timeline: its start, or a mask/unmask."""

    kind: MaskKind
    via: MaskVia
    core_uuid: str
    channel_uuid: str
    path: str
    timestamp_us: int


def event_time_us(value: str | None) -> int | None:
    """``Event-Date-Timestamp`` in microseconds; None unless ASCII digits of a plausible clock."""
    try:
        return parse_int((value or "").strip(), minimum=_MIN_TS, maximum=_MAX_TS, max_digits=16)
    except NumberError:
        return None


def _timestamp(event: Event) -> int:
    value = event_time_us(event.get("Event-Date-Timestamp"))
    if value is None:
        raise EventError(f"{event.name}: Event-Date-Timestamp is not a plausible clock")
    return value


def _channel(value: str | None, what: str) -> str:
    if not value or not _CHANNEL.fullmatch(value):
        raise EventError(f"{what}: the channel id is missing or not printable ASCII")
    return value


def _path(value: str | None, what: str) -> str:
    path = strip_variable_block((value or "").strip())
    if not path or len(path) > MAX_PATH:
        raise EventError(f"{what}: the recording path is empty or longer than {MAX_PATH}")
    if db_safe_text(path) != path:
        raise EventError(f"{what}: the recording path holds NUL or bytes that are not UTF-8")
    return path


def classify_mark(event: Event) -> RecordMark | None:
    """The mark an event makes, None if it makes none, EventError if it is malformed.

    None: an event of another kind, another application, ``uuid_record``
    start/stop (RECORD_START/STOP say it better). EventError: a mark whose
    channel, path or time cannot be trusted (the daemon refuses it, counted).
    """
    name = event.name
    if name == "RECORD_START":
        kind: MaskKind = "start"
        via: MaskVia = "record"
        channel = _channel(event.get("Unique-ID"), name)
        path = _path(event.get("Record-File-Path"), name)
    elif name == "CHANNEL_EXECUTE":
        app = event.get("Application") or ""
        if app not in _APPS:
            return None
        kind = "mask" if _APPS[app] == "mask" else "unmask"
        via = "dialplan"
        channel = _channel(event.get("Unique-ID"), app)
        path = _path(event.get("Application-Data"), app)
    elif name == "API":
        if (event.get("API-Command") or "").strip() != "uuid_record":
            return None
        # uuid_record <uuid> start|stop|mask|unmask <path> [<limit>]: FreeSWITCH
        # splits the argument on spaces, so the path is one word.
        words = (event.get("API-Command-Argument") or "").split(" ")
        words = [w for w in words if w]
        if len(words) < 2 or words[1] not in ("mask", "unmask"):
            return None
        kind = "mask" if words[1] == "mask" else "unmask"
        via = "api"
        channel = _channel(words[0], "uuid_record")
        path = _path(words[2] if len(words) > 2 else "", "uuid_record")
    else:
        return None
    core = event.get("Core-UUID") or ""
    if not _CHANNEL.fullmatch(core):
        raise EventError(f"{name}: Core-UUID is missing or not printable ASCII")
    return RecordMark(kind, via, core, channel, path, _timestamp(event))
