"""``POST /v1/recordings``: an uploaded body read as a stream, with deadlines and limits.

Why not Flask's ``request.files``: werkzeug spools a file part over 500 KB
to a temporary file, so the plaintext audio would land on disk, unencrypted,
before fsrecrypt saw it. Here the body is read from the WSGI input in
chunks, ``multipart/form-data`` is decoded with werkzeug's sans-I/O decoder
(events, no buffering beyond one chunk), and the file part's bytes go
straight into the encryptor (:func:`fsrecrypt.pipeline.store_upload`).

A request crosses a trust boundary here, so everything is bounded: the body
(``[playback] max_upload_bytes``, 413, also while a chunked body streams), the
whole upload (``upload_timeout``) and each pause between bytes
(``idle_timeout``), the part headers and the number of parts, each text
field. ``call_uuid`` is a plain ASCII token, the content must be audio (the
first bytes are checked, not only the declared type), and a WAV must be
complete (its header sizes match the bytes received). Whatever stops the
body early stores nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import gevent
from flask import Response, g, jsonify, request
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import (
    NEED_DATA,
    Data,
    Epilogue,
    Field,
    File,
    MultipartDecoder,
    Preamble,
    State,
)

from fsrecrypt import pipeline
from fsrecrypt.plaintext import HEAD_BYTES, wav_info, wav_state
from fsrecrypt.web import schemas
from fsrecrypt.web.access import Access, client_ip, user_agent
from fsrecrypt.web.auth import Principal
from fsrecrypt.web.errors import ApiError

if TYPE_CHECKING:
    from fsrecrypt.pipeline import Services
    from fsrecrypt.web.app import Params

CHUNK = 64 * 1024
MAX_PARTS = 8
MAX_PART_HEADER_BYTES = 8 * 1024
MAX_FIELD_BYTES = {"call_uuid": 128, "consent": 64, "metadata": 4096}
MAX_METADATA_KEYS = 32
MAX_METADATA_VALUE = 256
BODY_READ = "fsrecrypt.body_read"
"""WSGI environ flag: the app read the request body to its end. A body left
unread (refused before or while reading it: 401, 413, 415, a cut upload) is
never read by the server (it may never come, and gevent would wait for it
without a deadline): the connection is closed after the answer instead."""


def body_left_unread(environ: Mapping[str, Any]) -> bool:
    """True when the request has a body the app did not read to its end."""
    if environ.get(BODY_READ):
        return False
    chunked = "chunked" in str(environ.get("HTTP_TRANSFER_ENCODING", "")).lower()
    return chunked or str(environ.get("CONTENT_LENGTH") or "0").strip() not in ("", "0")


_CALL_UUID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", re.ASCII)
_CONSENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:-]{0,63}", re.ASCII)
_METADATA_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", re.ASCII)
_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}", re.ASCII)
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,./:=?-]{1,70}", re.ASCII)
WAV_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})
AUDIO_TYPES = WAV_TYPES | {"audio/mpeg", "audio/ogg", "audio/flac", "audio/x-flac"}
FILE_PART_TYPES = AUDIO_TYPES | {"application/octet-stream"}
_SNIFF_TYPES = {"wav": WAV_TYPES, "mp3": {"audio/mpeg"}, "ogg": {"audio/ogg"}}
_SNIFF_TYPES["flac"] = {"audio/flac", "audio/x-flac"}


def _bad(message: str, code: str, hint: str, status: int = 400) -> ApiError:
    return ApiError(message, status=status, code=code, hint=hint)


def incomplete(detail: str) -> ApiError:
    return _bad(
        f"the upload ended before its body was complete ({detail}); nothing was stored",
        "upload_incomplete",
        "Send the whole body again (with the same Idempotency-Key).",
    )


def _headers_too_large() -> ApiError:
    return _bad(
        f"a part's headers (or the preamble) exceed {MAX_PART_HEADER_BYTES} bytes",
        "part_headers_too_large",
        "Send ordinary multipart/form-data.",
        status=431,
    )


def too_large(limit: int) -> ApiError:
    return _bad(
        f"the upload is larger than this server accepts ({limit} bytes)",
        "upload_too_large",
        "Ask the operators to raise [playback] max_upload_bytes, or upload a smaller file.",
        status=413,
    )


class Body:
    """The request body as chunks: size limit, overall deadline, and a deadline per read.

    Reads ``wsgi.input`` (gevent's, which honours Content-Length and decodes
    chunked transfer coding). A body that ends before its Content-Length,
    a reset connection, a malformed chunk or a pause longer than ``gap``
    seconds raise :func:`incomplete`; more than ``limit`` bytes raise
    :func:`too_large`. ``complete`` is True once the body was read to its end.
    """

    def __init__(
        self,
        stream: Any,
        *,
        limit: int,
        deadline: float,
        gap: float,
        clock: Callable[[], float],
    ) -> None:
        self._stream = stream
        self.limit = limit
        self._ends_at = clock() + deadline
        self._gap = gap
        self._clock = clock
        self.received = 0
        self.complete = False

    def _read(self) -> bytes:
        left = self._ends_at - self._clock()
        if left <= 0:
            raise incomplete("the upload took longer than [playback] upload_timeout")
        wait = min(self._gap, left)
        try:
            with gevent.Timeout(wait):
                return bytes(self._stream.read(CHUNK))
        except gevent.Timeout:
            raise incomplete(f"no data for {wait:.0f} seconds") from None
        except (OSError, ValueError) as exc:  # EOF before Content-Length, reset, bad chunk
            raise incomplete(type(exc).__name__) from None

    def chunks(self) -> Iterator[bytes]:
        while True:
            chunk = self._read()
            if not chunk:
                self.complete = True
                return
            self.received += len(chunk)
            if self.received > self.limit:
                raise too_large(self.limit)
            yield chunk


class FormReader:
    """``multipart/form-data`` from body chunks: text fields first, then the ``file`` part.

    The text fields (``call_uuid``, ``consent``, ``metadata``) must come
    before ``file`` (curl ``-F`` and browsers' FormData send parts in the
    order given): the recording's row is created when the file part starts.
    """

    def __init__(self, chunks: Iterator[bytes], boundary: str) -> None:
        self._chunks = chunks
        self._decoder = MultipartDecoder(boundary.encode("ascii"), max_parts=MAX_PARTS)
        self._ended = False

    def _event(self) -> Any:
        decoder = self._decoder
        while True:
            headers_at = len(decoder.buffer) if decoder.state in (State.PREAMBLE, State.PART) else 0
            try:
                event = decoder.next_event()
            except ValueError:  # malformed (also undecodable part headers)
                raise self._malformed() from None
            except Exception as exc:  # werkzeug's RequestEntityTooLarge: too many parts
                if getattr(exc, "code", None) == 413:
                    raise _bad(
                        f"the form has more than {MAX_PARTS} parts",
                        "too_many_parts",
                        "Send call_uuid, consent, metadata and file only.",
                    ) from None
                raise
            if event is not NEED_DATA:
                # what a part's headers (or the preamble) took, also when they came in one read
                if headers_at - len(decoder.buffer) > MAX_PART_HEADER_BYTES:
                    raise _headers_too_large()
                return event
            if decoder.state in (State.PREAMBLE, State.PART) and (
                len(decoder.buffer) > MAX_PART_HEADER_BYTES
            ):
                raise _headers_too_large()
            chunk = next(self._chunks, None)
            if chunk is None:
                if self._ended:
                    raise incomplete("the form data stops before its closing boundary")
                self._ended = True
            decoder.receive_data(chunk)

    @staticmethod
    def _malformed() -> ApiError:
        return _bad(
            "the body is not valid multipart/form-data",
            "malformed_form",
            "Send the fields, then the file, as curl -F does.",
        )

    def fields_and_file(self) -> tuple[dict[str, str], str, Iterator[bytes]]:
        """The text fields, the file part's content type, and its bytes as they arrive."""
        fields: dict[str, str] = {}
        while True:
            event = self._event()
            if isinstance(event, Preamble):
                continue
            if isinstance(event, Epilogue):
                raise _bad("the form has no 'file' part", "missing_file", "Add -F file=@call.wav.")
            if isinstance(event, File):
                if event.name != "file":
                    raise _bad(
                        f"unexpected file part {event.name[:40]!r}",
                        "unexpected_part",
                        "Send the audio as the part named 'file'.",
                    )
                ctype = parse_options_header(event.headers.get("content-type", ""))[0].lower()
                return fields, ctype, self._file_data()
            if isinstance(event, Field):
                name = event.name
                if name not in MAX_FIELD_BYTES:
                    raise _bad(
                        f"unexpected form field {name[:40]!r}",
                        "unexpected_part",
                        "Fields are call_uuid, consent and metadata, then file.",
                    )
                if name in fields:
                    raise _bad(f"form field {name!r} is given twice", "duplicate_field", "Once.")
                fields[name] = self._field_value(name)
                continue
            raise self._malformed()

    def _field_value(self, name: str) -> str:
        limit = MAX_FIELD_BYTES[name]
        value = bytearray()
        while True:
            event = self._event()
            if not isinstance(event, Data):
                raise self._malformed()
            value += event.data
            if len(value) > limit:
                raise _bad(f"form field {name!r} exceeds {limit} bytes", "field_too_large", "")
            if not event.more_data:
                break
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"form field {name!r} is not UTF-8", "invalid_field", "") from None

    def _file_data(self) -> Iterator[bytes]:
        while True:
            event = self._event()
            if not isinstance(event, Data):
                raise self._malformed()
            if event.data:
                yield event.data
            if not event.more_data:
                return

    def finish(self) -> None:
        """After the file: only the closing boundary may follow (fields come first)."""
        event = self._event()
        if isinstance(event, Field | File):
            raise _bad(
                "a form part follows the file",
                "fields_after_file",
                "Send call_uuid, consent and metadata before file (curl -F in that order).",
            )
        if not isinstance(event, Epilogue):
            raise self._malformed()


def boundary_of(content_type: str) -> str | None:
    """The multipart boundary if ``content_type`` is multipart/form-data (else None)."""
    ctype, options = parse_options_header(content_type)
    if ctype.lower() != "multipart/form-data":
        return None
    boundary = options.get("boundary", "")
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise _bad(
            "multipart/form-data needs a boundary of 1-70 plain characters",
            "malformed_form",
            "Let curl -F or the browser's FormData set the Content-Type.",
        )
    return boundary


def unsupported_type(what: str) -> ApiError:
    return _bad(
        f"{what} is not an accepted upload type",
        "unsupported_media_type",
        "Send multipart/form-data (file, call_uuid) or a raw audio/wav, audio/mpeg, "
        "audio/ogg or audio/flac body.",
        status=415,
    )


def call_uuid_of(value: str | None) -> str:
    if not value:
        raise _bad(
            "call_uuid is required", "missing_call_uuid", "Add -F call_uuid=<the call's UUID>."
        )
    if not _CALL_UUID_RE.fullmatch(value):
        raise _bad(
            "call_uuid must be 1-128 ASCII letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit",
            "invalid_call_uuid",
            "Send the call's UUID as FreeSWITCH names it.",
        )
    return value


def consent_of(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not _CONSENT_RE.fullmatch(value):
        raise _bad(
            "consent must be 1-64 ASCII letters, digits, spaces, '.', '_', ':' or '-'",
            "invalid_consent",
            "e.g. consent=announced.",
        )
    return value


def metadata_of(value: str | None) -> dict[str, Any]:
    """The client's metadata: a flat JSON object of short scalar values, or 400."""
    if not value:
        return {}
    hint = 'A flat JSON object of up to 32 keys, e.g. {"agent": "42", "queue": "sales"}.'
    try:
        doc = json.loads(value)
    except ValueError:
        raise _bad("metadata is not JSON", "invalid_metadata", hint) from None
    if not isinstance(doc, dict) or len(doc) > MAX_METADATA_KEYS:
        raise _bad("metadata must be a JSON object of at most 32 keys", "invalid_metadata", hint)
    for key, item in doc.items():
        ok_value = (
            item is None
            or isinstance(item, bool | int | float)
            or (isinstance(item, str) and len(item) <= MAX_METADATA_VALUE and "\x00" not in item)
        )
        if not _METADATA_KEY_RE.fullmatch(key) or not ok_value:
            raise _bad(
                f"metadata key {key[:40]!r} or its value is refused", "invalid_metadata", hint
            )
    return doc


def idempotency_key_of(value: str | None) -> str | None:
    if value is None:
        return None
    if not _IDEMPOTENCY_KEY_RE.fullmatch(value):
        raise _bad(
            "Idempotency-Key must be 1-255 printable ASCII characters",
            "invalid_idempotency_key",
            "Use a UUID per upload, the same one on each retry.",
        )
    return value


def sniff(head: bytes) -> str | None:
    """The audio container the first bytes show (``wav``, ``mp3``, ``ogg``, ``flac``), or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def take_head(chunks: Iterator[bytes]) -> tuple[bytes, Iterator[bytes]]:
    """The first HEAD_BYTES of ``chunks`` (fewer if shorter), and all the bytes as chunks again."""
    head = bytearray()
    for chunk in chunks:
        head += chunk
        if len(head) >= HEAD_BYTES:
            break
    first = bytes(head)

    def again() -> Iterator[bytes]:
        if first:
            yield first
        yield from chunks

    return first[:HEAD_BYTES], again()


def checked_container(head: bytes, declared: str) -> str:
    """The container of an upload, refused (415) unless its bytes are audio of its declared type."""
    kind = sniff(head)
    if kind is None:
        raise unsupported_type("content that is not audio (WAV, MP3, Ogg or FLAC)")
    if declared != "application/octet-stream" and declared not in _SNIFF_TYPES[kind]:
        raise unsupported_type(f"{kind} content declared as {declared[:60]!r}")
    return kind


def finished_checks(head: bytes, kind: str) -> Callable[[int], Mapping[str, Any]]:
    """The check run once the body went through: a WAV's header must match its length."""

    def check(length: int) -> Mapping[str, Any]:
        if kind != "wav":
            return {"container": kind}
        state = wav_state(head, length)
        if state != "complete":
            raise _bad(
                f"the WAV's header does not match its {length} bytes (cut short or still "
                "being written); nothing was stored",
                "incomplete_wav",
                "Upload the finished recording.",
                status=422,
            )
        return {"wav": wav_info(head, length)}

    return check


def upload_recording(
    services: Services,
    access: Access,
    params: Params,
    principal: Principal,
    clock: Callable[[], float],
) -> Response:
    """``POST /v1/recordings`` for an authenticated ``principal`` (see the module doc)."""
    playback = services.config.playback
    content_type = request.headers.get("Content-Type", "")
    boundary = boundary_of(content_type)
    declared = parse_options_header(content_type)[0].lower()
    if boundary is None and declared not in AUDIO_TYPES:
        raise unsupported_type(repr(declared[:60]) if declared else "a body without Content-Type")
    length = request.content_length
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if length is None and not chunked:
        raise _bad("the upload has no Content-Length", "length_required", "", status=411)
    if length is not None and length > playback.max_upload_bytes:
        raise too_large(playback.max_upload_bytes)
    idempotency_key = idempotency_key_of(params.header("Idempotency-Key"))
    if idempotency_key is not None:
        earlier = services.db.upload_by_key(principal.tenant_id, idempotency_key)
        if earlier is not None:
            return _replayed(access, earlier)
    body = Body(
        request.environ["wsgi.input"],
        limit=playback.max_upload_bytes,
        deadline=playback.upload_timeout,
        gap=playback.idle_timeout,
        clock=clock,
    )
    form: FormReader | None = None
    if boundary is not None:
        form = FormReader(body.chunks(), boundary)
        fields, declared, data = form.fields_and_file()
        if declared and declared not in FILE_PART_TYPES:
            raise unsupported_type(f"a file part of type {declared[:60]!r}")
        declared = declared or "application/octet-stream"
        call_uuid = call_uuid_of(fields.get("call_uuid"))
        consent = consent_of(fields.get("consent"))
        metadata = metadata_of(fields.get("metadata"))
    else:
        data = body.chunks()
        call_uuid = call_uuid_of(params.text("call_uuid"))
        consent = consent_of(params.text("consent"))
        metadata = {}
    head, data = take_head(data)
    kind = checked_container(head, declared)
    wav_check = finished_checks(head, kind)

    def check(length: int) -> Mapping[str, Any]:
        if form is not None:
            form.finish()
        if not body.complete:
            raise incomplete("bytes follow the file")
        return wav_check(length)

    row_metadata: dict[str, Any] = {"consent": consent}
    if metadata:
        row_metadata["client_metadata"] = metadata
    who = principal.audit_details()
    outcome = pipeline.store_upload(
        services,
        pipeline.UploadRequest(
            tenant_id=principal.tenant_id,
            call_uuid=call_uuid,
            user_id=principal.user_id,
            idempotency_key=idempotency_key,
            metadata=row_metadata,
            audit={"ip_address": client_ip(), "user_agent": user_agent()},
            details=who,
        ),
        data,
        lease_seconds=playback.upload_timeout + 60,
        check=check,
    )
    g.audited = True
    if outcome.replayed:  # a concurrent upload with the same key won the race
        return _replayed(access, outcome.recording)
    request.environ[BODY_READ] = True
    response = jsonify(schemas.to_json(schemas.recording_of(outcome.recording)))
    response.status_code = 201
    response.headers["Location"] = f"/v1/recordings/{outcome.recording.id}"
    return response


def _replayed(access: Access, earlier: Any) -> Response:
    """The first upload's answer for a retry with its Idempotency-Key (409 while it runs)."""
    if earlier.status == "pending":
        access.audit("upload", False, recording=earlier, error="upload_in_progress")
        raise ApiError(
            f"an upload with this Idempotency-Key is still in progress ({earlier.id})",
            status=409,
            code="upload_in_progress",
            hint="Retry in a few seconds: the first upload's result is returned once it ends.",
            headers={"Retry-After": "2", "Connection": "close"},
        )
    access.audit("upload", True, recording=earlier, details={"replayed": True})
    response = jsonify(schemas.to_json(schemas.recording_of(earlier)))
    response.status_code = 201
    response.headers["Location"] = f"/v1/recordings/{earlier.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return response
