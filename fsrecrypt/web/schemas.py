"""What the API answers, as typed definitions: the views build these, the document describes them.

One definition serves both ends: :func:`to_json` turns an instance into the
response body (fields in declaration order), and
:func:`fsrecrypt.web.openapi.schema_of` turns the class into its OpenAPI
schema. A field's type says what it holds (``X | None``: present, may be
null; ``Literal``: an enum); a field with a default of None is left out of
the body when it is None; ``fmt`` names the string format.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

RecordingStatus = Literal["pending", "stored", "failed", "discarded", "erased"]


def fmt(name: str) -> Any:
    """A (required) field whose string value has the OpenAPI format ``name``."""
    return field(metadata={"format": name})


@dataclass(frozen=True)
class ErrorDetail:
    code: str
    message: str
    hint: str | None = None


@dataclass(frozen=True)
class Error:
    """Every error body: ``{"error": {"code", "message", "hint"}}`` with a stable code."""

    error: ErrorDetail


Role = Literal["listen", "download", "ingest", "admin"]
Via = Literal["api_key", "jwt", "signed_url"]


@dataclass(frozen=True)
class Principal:
    """The caller (``GET /v1/me``): tenant, user, roles, how they signed in (``auth.Principal``).

    ``key_id`` for an API key, ``issuer`` for a bearer token, ``service_user``
    when a service key acts for ``user`` (``X-On-Behalf-Of``).
    """

    tenant: str
    tenant_id: str = fmt("uuid")
    user: str
    roles: list[Role]
    via: Via
    key_id: str | None = None
    issuer: str | None = None
    service_user: str | None = None


@dataclass(frozen=True)
class MaskSpan:
    """A masked (PCI-paused) span, in ms from the start of the audio.

    ``announced_*``: where the mask events put it; ``start_ms``/``end_ms``:
    the digital silence found in the audio before encryption (null when none
    was found there: ``silent`` false). ``announced_end_ms`` null: still
    masked when the recording stopped.
    """

    announced_start_ms: int
    announced_end_ms: int | None
    start_ms: int | None
    end_ms: int | None
    silent: bool
    via: Literal["dialplan", "api"]


@dataclass(frozen=True)
class Recording:
    id: str = fmt("uuid")
    call_uuid: str | None
    status: RecordingStatus
    created_at: str = fmt("date-time")
    stored_at: str | None = fmt("date-time")
    erased_at: str | None = fmt("date-time")
    size_bytes: int | None
    duration_s: float | None
    sample_rate: int | None
    channels: int | None
    stream_url: str
    playback_url: str
    # null: no mask announced; false: a span the audio does not show as silence.
    mask_verified: bool | None
    masked_spans: list[MaskSpan]


@dataclass(frozen=True)
class RecordingList:
    recordings: list[Recording]


@dataclass(frozen=True)
class UploadForm:
    """The multipart/form-data of ``POST /v1/recordings``: the text fields first, then ``file``."""

    call_uuid: str
    file: str = fmt("binary")
    consent: str | None = None
    metadata: str | None = None


@dataclass(frozen=True)
class PlaybackUrl:
    url: str
    expires_at: str = fmt("date-time")
    expires_in: int


@dataclass(frozen=True)
class HoldRequest:
    """The body of the hold routes: why (a case or matter number; on release, why it ends)."""

    reason: str


@dataclass(frozen=True)
class EraseRequest:
    """The body of ``POST /erase``: why, and whether to erase inside the retention period."""

    reason: str
    override_retention: bool = False


@dataclass(frozen=True)
class HoldResult:
    recording_id: str = fmt("uuid")
    status: Literal["held", "already held", "erased", "released", "not held"]
    hold_id: int | None = None
    storage_legal_hold: str | None = None


@dataclass(frozen=True)
class HoldResults:
    """What ``fsrecrypt hold add|remove`` prints, per recording."""

    results: list[HoldResult]


REQUEST_TEXT_LIMIT = 1000
"""Characters a string field of a request body may hold (a reason, a case number)."""


def from_json(cls: type, value: Any) -> Any:
    """A request body (parsed JSON) as an instance of ``cls``; ValueError saying what is wrong.

    Only the fields ``cls`` declares, each of its declared type (str, bool,
    int; strings 1..REQUEST_TEXT_LIMIT characters), the required ones present.
    """
    if not isinstance(value, dict):
        raise ValueError("the body must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"unknown field {unknown[0][:40]!r} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in value:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"the field {name!r} is required")
            continue
        item, want = value[name], hints[name]
        if want is bool and not isinstance(item, bool):
            raise ValueError(f"{name} must be true or false")
        if want is int and (isinstance(item, bool) or not isinstance(item, int)):
            raise ValueError(f"{name} must be an integer")
        if want is str and not (
            isinstance(item, str) and 0 < len(item.strip()) and len(item) <= REQUEST_TEXT_LIMIT
        ):
            raise ValueError(f"{name} must be a string of 1-{REQUEST_TEXT_LIMIT} characters")
        out[name] = item
    return cls(**out)


def to_json(value: Any) -> Any:
    """The response body for a schema instance (nested, in field order)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        body = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.default is None:
                continue
            body[f.name] = to_json(item)
        return body
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def recording_of(recording: Any) -> Recording:
    """The API's view of a database recording row."""
    wav = (recording.encryption_metadata or {}).get("wav") or {}
    base = f"/v1/recordings/{recording.id}"
    return Recording(
        id=recording.id,
        call_uuid=recording.call_uuid,
        status=recording.status,
        created_at=iso(recording.created_at),  # type: ignore[arg-type]
        stored_at=iso(recording.stored_at),
        erased_at=iso(recording.erased_at),
        size_bytes=recording.file_size_bytes,
        duration_s=wav.get("duration_s"),
        sample_rate=wav.get("sample_rate"),
        channels=wav.get("channels"),
        stream_url=f"{base}/stream",
        playback_url=f"{base}/playback",
        mask_verified=recording.mask_verified,
        masked_spans=[_mask_span(s) for s in recording.mask_spans or [] if isinstance(s, dict)],
    )


def _mask_span(span: dict[str, Any]) -> MaskSpan:
    """One stored span (``call_recordings.mask_spans``) as the API shows it."""

    def ms(name: str) -> int | None:
        value = span.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return MaskSpan(
        announced_start_ms=ms("announced_start_ms") or 0,
        announced_end_ms=ms("announced_end_ms"),
        start_ms=ms("start_ms"),
        end_ms=ms("end_ms"),
        silent=span.get("silent") is True,
        via="api" if span.get("via") == "api" else "dialplan",
    )
