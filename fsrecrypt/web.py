"""The playback server (``fsrecrypt serve``) and its API keys (``fsrecrypt apikeys``).

Why the server decrypts and streams instead of handing out keys: the data key
of a recording never leaves this process. A browser gets audio bytes, each
frame authenticated before its first byte is sent, and a seek fetches only
the frames that hold the requested range (one ranged GET), so listening to
minute 55 of an hour-long call costs one frame's worth of latency, not the
whole object.

Who may listen: an API key (header ``X-API-Key``) names a user of one tenant;
a recording of another tenant does not exist for that user (404, never 403,
so ids cannot be probed). Because ``<audio src=...>`` cannot send headers,
``/playback`` issues a short-lived signed URL (HMAC over recording, tenant,
user, API key and expiry) that the stream endpoint accepts instead. Every
access, refused and failed ones included, writes a row to the tenant's
hash-chained access log.

This module is listed in ``cli.LAZY_COMMANDS``: only click, the standard
library and fsrecrypt's config/errors are imported at top level. Flask,
gevent and psycopg2 are imported inside the functions that need them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fsrecrypt.errors import (
    AlreadyExists,
    AuthError,
    ConfigError,
    DatabaseError,
    FsrecryptError,
    IntegrityError,
    InvalidState,
    KeyAccessError,
    MalformedMessage,
    NotFound,
    ObjectNotFound,
    RangeNotSatisfiable,
    RecordingGone,
    StorageError,
)
from fsrecrypt.numbers import NumberError, parse_int

if TYPE_CHECKING:
    from flask import Flask

    from fsrecrypt.pipeline import Services

log = logging.getLogger("fsrecrypt.web")

API_KEY_HEADER = "X-API-Key"
API_KEY_PREFIX = "fsr_"
_API_KEY_RE = re.compile(r"^fsr_([0-9a-f]{16})_([A-Za-z0-9_-]{43})\Z")
_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_SIGNATURE_RE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")
_LAST_USED_GRANULARITY_S = 60
SIGNING_KEY_BYTES = 32
STATIC_DIR = "web_static"
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
PATH_LIMIT = 256
RANGE_LIMIT = 100
REQUESTED_ID_LIMIT = 64
EXPIRY_DIGITS = 12
"""A signed URL's exp has at most 12 digits (Unix seconds up to the year 33658)."""


# --- errors the API answers with ------------------------------------------------------


class ApiError(FsrecryptError):
    """An error the API reports as JSON: an HTTP status and a stable machine code."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        hint: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class ApiAuthError(AuthError):
    """A request whose credentials (API key or signed URL) are missing or refused."""

    def __init__(self, message: str, *, code: str, status: int = 401, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.code = code
        self.status = status


class BadRange(RangeNotSatisfiable):
    """A Range header that is malformed, asks for several ranges, or lies outside the audio."""

    hint = "Send one range 'bytes=START-END', 'bytes=START-' or 'bytes=-SUFFIX' inside the size."


# --- API keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user of one tenant, authenticated by an API key or a signed URL."""

    tenant_id: str
    tenant_name: str
    user_id: str
    key_id: str
    via: str


@dataclass(frozen=True)
class ApiKeyRow:
    key_id: str
    tenant_id: str
    tenant_name: str
    user_id: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def hash_api_key(key: str) -> str:
    """sha256 of the whole key: the secret carries 256 random bits, so no slow KDF is needed."""
    return hashlib.sha256(b"fsrecrypt-apikey-v1:" + key.encode("ascii")).hexdigest()


def new_api_key() -> tuple[str, str]:
    """A fresh (key_id, key): the id is public, the key is shown once and never stored."""
    key_id = secrets.token_hex(8)
    return key_id, f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def create_api_key(services: Services, tenant_name: str, user_id: str) -> tuple[ApiKeyRow, str]:
    """Store the hash of a new key for ``user_id`` of the tenant; return the row and the key."""
    user_id = user_id.strip()
    if not user_id or len(user_id) > 200:
        raise ConfigError(
            "the user id must be 1-200 characters",
            hint="Pass the supervisor's user id, e.g. --user alice@example.com.",
        )
    tenant = services.db.tenant_by_name(tenant_name)
    key_id, key = new_api_key()
    with services.db.transaction("creating an API key") as cur:
        cur.execute(
            "INSERT INTO api_keys (key_id, key_hash, tenant_id, user_id) VALUES (%s, %s, %s, %s)"
            " RETURNING created_at",
            (key_id, hash_api_key(key), tenant.id, user_id),
        )
        created_at = cur.fetchone()[0]
    services.db.audit(
        action="apikey_create",
        user_id=user_id,
        success=True,
        tenant_id=tenant.id,
        details={"key_id": key_id},
    )
    return ApiKeyRow(key_id, tenant.id, tenant.name, user_id, created_at, None, None), key


def list_api_keys(services: Services, tenant_name: str | None = None) -> list[ApiKeyRow]:
    with services.db.transaction("listing API keys") as cur:
        cur.execute(
            "SELECT k.key_id, k.tenant_id, t.name, k.user_id, k.created_at, k.last_used_at,"
            " k.revoked_at FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
            " WHERE %s IS NULL OR t.name = %s ORDER BY t.name, k.user_id, k.created_at",
            (tenant_name, tenant_name),
        )
        return [ApiKeyRow(r[0], str(r[1]), *r[2:]) for r in cur.fetchall()]


def revoke_api_key(services: Services, key_id: str) -> ApiKeyRow:
    """Revoke a key by its public id; its signed URLs stop working at once too."""
    if key_id.startswith(API_KEY_PREFIX):
        match = _API_KEY_RE.match(key_id)
        key_id = match[1] if match else key_id
    with services.db.transaction("revoking an API key") as cur:
        cur.execute(
            "UPDATE api_keys k SET revoked_at = coalesce(k.revoked_at, now())"
            " FROM tenants t WHERE t.id = k.tenant_id AND k.key_id = %s"
            " RETURNING k.key_id, k.tenant_id, t.name, k.user_id, k.created_at,"
            " k.last_used_at, k.revoked_at",
            (key_id,),
        )
        row = cur.fetchone()
    if row is None:
        raise NotFound(
            f"no API key with id {key_id!r}",
            hint="List the key ids with 'fsrecrypt apikeys list'.",
        )
    revoked = ApiKeyRow(row[0], str(row[1]), *row[2:])
    services.db.audit(
        action="apikey_revoke",
        user_id=revoked.user_id,
        success=True,
        tenant_id=revoked.tenant_id,
        details={"key_id": revoked.key_id},
    )
    return revoked


def _active_key(services: Services, key_id: str) -> tuple[ApiKeyRow, str] | None:
    """The active (unrevoked) key row and its stored hash, touching last_used_at (coarsely)."""
    with services.db.transaction("checking an API key") as cur:
        cur.execute(
            "SELECT k.key_id, k.tenant_id, t.name, k.user_id, k.created_at, k.last_used_at,"
            " k.revoked_at, k.key_hash FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
            " WHERE k.key_id = %s AND k.revoked_at IS NULL",
            (key_id,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute(
            "UPDATE api_keys SET last_used_at = now() WHERE key_id = %s AND"
            " (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => %s))",
            (key_id, _LAST_USED_GRANULARITY_S),
        )
    return ApiKeyRow(row[0], str(row[1]), *row[2:7]), row[7]


def authenticate_api_key(services: Services, key: str) -> Principal:
    """The principal behind an ``X-API-Key`` value, or ApiAuthError (never saying what failed)."""
    match = _API_KEY_RE.match(key.strip())
    refused = ApiAuthError(
        "the API key is not valid",
        code="invalid_api_key",
        hint="Use an active key from 'fsrecrypt apikeys create'; revoked keys stop working.",
    )
    if match is None:
        raise refused
    found = _active_key(services, match[1])
    if found is None:
        raise refused
    row, stored_hash = found
    if not hmac.compare_digest(stored_hash, hash_api_key(key.strip())):
        raise refused
    return Principal(row.tenant_id, row.tenant_name, row.user_id, row.key_id, "api_key")


# --- signed playback URLs --------------------------------------------------------------------


def load_signing_key(path: str) -> bytes:
    """The URL-signing key, created (0600, 256 random bits) on first use.

    The file is refused if group or others can read it, or if it is a
    symlink: whoever reads it can mint playback URLs for any recording.
    """
    target = Path(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except FileNotFoundError:
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return load_signing_key(path)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the URL signing key {target}: {exc.strerror}",
                hint="Make [playback] signing_key_file's directory writable by fsrecrypt.",
            ) from None
        try:
            os.write(fd, base64.b64encode(secrets.token_bytes(SIGNING_KEY_BYTES)) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return load_signing_key(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot open the URL signing key {target}: {exc.strerror}",
            hint="[playback] signing_key_file must be a regular file owned by fsrecrypt.",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise ConfigError(
                f"URL signing key {target} is readable by group/others or not a regular file",
                hint="Run 'chmod 600' on it; anyone who reads it can mint playback URLs.",
            )
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) < SIGNING_KEY_BYTES:
        raise ConfigError(
            f"URL signing key {target} is not a base64 key of at least 32 bytes",
            hint="Delete the file: fsrecrypt serve creates a new one (issued URLs stop working).",
        )
    return key


class UrlSigner:
    """HMAC-SHA256 over everything a playback URL grants: recording, tenant, user, key, expiry."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "UrlSigner(<key hidden>)"

    def signature(self, recording_id: str, principal: Principal, expires: int) -> str:
        message = "\n".join(
            (
                "fsrecrypt-playback-v1",
                recording_id.lower(),
                principal.tenant_id,
                principal.user_id,
                principal.key_id,
                str(expires),
            )
        ).encode("utf-8")
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def query(self, recording_id: str, principal: Principal, expires: int) -> dict[str, str]:
        return {
            "kid": principal.key_id,
            "exp": str(expires),
            "sig": self.signature(recording_id, principal, expires),
        }

    def verify(
        self, services: Services, recording_id: str, args: dict[str, str], now: float
    ) -> Principal:
        """The principal a signed URL speaks for, or ApiAuthError (expired, altered, revoked)."""
        kid, exp, sig = args.get("kid", ""), args.get("exp", ""), args.get("sig", "")
        altered = ApiAuthError(
            "the playback URL is not valid (altered, or issued for another recording)",
            code="invalid_signature",
            status=403,
            hint="Ask GET /v1/recordings/{id}/playback for a new URL.",
        )
        try:
            expires = parse_int(exp, minimum=0, max_digits=EXPIRY_DIGITS)
        except NumberError as exc:
            raise ApiAuthError(
                f"the playback URL's exp is not a Unix time in seconds ({exc})",
                code="invalid_parameter",
                status=400,
                hint="Ask GET /v1/recordings/{id}/playback for a new URL.",
            ) from None
        if not (re.fullmatch(r"[0-9a-f]{16}", kid) and _SIGNATURE_RE.fullmatch(sig)):
            raise altered
        found = _active_key(services, kid)
        if found is None:
            raise altered
        row, _hash = found
        principal = Principal(row.tenant_id, row.tenant_name, row.user_id, row.key_id, "signed_url")
        if not hmac.compare_digest(self.signature(recording_id, principal, expires), sig):
            raise altered
        if expires <= now:
            raise ApiAuthError(
                "the playback URL has expired",
                code="url_expired",
                status=403,
                hint="Ask GET /v1/recordings/{id}/playback for a new URL.",
            )
        return principal


# --- Range headers ----------------------------------------------------------------------------


_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)


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


# --- the API document -------------------------------------------------------------------------


def _error_responses(*statuses: int) -> dict[str, Any]:
    descriptions = {
        400: "Bad request parameters",
        401: "Missing or invalid API key",
        403: "Invalid or expired signed URL",
        404: "No such recording for this tenant",
        409: "The recording is not stored yet",
        410: "The recording was erased",
        416: "Range not satisfiable, malformed or multiple",
        500: "Integrity or internal failure (no details)",
        503: "A backing service is unavailable; retry",
    }
    return {
        str(s): {
            "description": descriptions[s],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for s in statuses
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 description of the API, published at /v1/openapi.json."""
    from fsrecrypt import __version__

    recording_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }
    signed = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": desc,
            "schema": {"type": "string"},
        }
        for name, desc in (
            ("kid", "Signed URL: the issuing API key id"),
            ("exp", "Signed URL: expiry (Unix seconds)"),
            ("sig", "Signed URL: HMAC-SHA256 signature"),
        )
    ]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "fsrecrypt playback API",
            "version": __version__,
            "description": (
                "Lists a tenant's encrypted call recordings and streams them with server-side "
                "decryption and HTTP Range support. Every access is written to the tenant's "
                'hash-chained access log. Errors are JSON: {"error": {"code", "message", '
                '"hint"}} with a stable code.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"ApiKey": []}],
        "paths": {
            "/v1/me": {
                "get": {
                    "operationId": "whoAmI",
                    "summary": "The tenant and user behind the API key",
                    "responses": {
                        "200": {
                            "description": "The caller",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Principal"}
                                }
                            },
                        },
                        **_error_responses(401),
                    },
                }
            },
            "/v1/recordings": {
                "get": {
                    "operationId": "listRecordings",
                    "summary": "The tenant's recordings, oldest first",
                    "parameters": [
                        {"name": "call_uuid", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "from",
                            "in": "query",
                            "description": "Created at or after (ISO 8601; UTC if no offset)",
                            "schema": {"type": "string", "format": "date-time"},
                        },
                        {
                            "name": "to",
                            "in": "query",
                            "description": "Created before (ISO 8601; UTC if no offset)",
                            "schema": {"type": "string", "format": "date-time"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_LIST_LIMIT,
                                "default": DEFAULT_LIST_LIMIT,
                            },
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "Matching recordings",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "recordings": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Recording"},
                                            }
                                        },
                                    }
                                }
                            },
                        },
                        **_error_responses(400, 401, 503),
                    },
                }
            },
            "/v1/recordings/{id}": {
                "get": {
                    "operationId": "getRecording",
                    "summary": "One recording's metadata",
                    "parameters": [recording_id],
                    "responses": {
                        "200": {
                            "description": "The recording",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Recording"}
                                }
                            },
                        },
                        **_error_responses(401, 404, 503),
                    },
                }
            },
            "/v1/recordings/{id}/stream": {
                "get": {
                    "operationId": "streamRecording",
                    "summary": "The decrypted audio (audio/wav), with single-range support",
                    "description": (
                        "Authenticated by X-API-Key or by a signed URL from /playback. Each "
                        "frame is authenticated before its bytes are sent; an integrity failure "
                        "mid-stream aborts the connection. Audited as action 'stream' with the "
                        "byte range."
                    ),
                    "security": [{"ApiKey": []}, {}],
                    "parameters": [
                        recording_id,
                        {
                            "name": "Range",
                            "in": "header",
                            "description": "bytes=START-END, bytes=START- or bytes=-SUFFIX",
                            "schema": {"type": "string"},
                        },
                        *signed,
                    ],
                    "responses": {
                        "200": {
                            "description": "The whole recording",
                            "content": {
                                "audio/wav": {"schema": {"type": "string", "format": "binary"}}
                            },
                        },
                        "206": {
                            "description": "The requested range (Content-Range)",
                            "content": {
                                "audio/wav": {"schema": {"type": "string", "format": "binary"}}
                            },
                        },
                        **_error_responses(401, 403, 404, 409, 410, 416, 500, 503),
                    },
                }
            },
            "/v1/recordings/{id}/playback": {
                "get": {
                    "operationId": "playbackUrl",
                    "summary": "A short-lived signed URL to the stream, for <audio src>",
                    "parameters": [
                        recording_id,
                        {
                            "name": "ttl",
                            "in": "query",
                            "description": "Lifetime in seconds (at most [playback] url_ttl)",
                            "schema": {"type": "integer", "minimum": 1},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The signed URL",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/PlaybackUrl"}
                                }
                            },
                        },
                        **_error_responses(400, 401, 404, 409, 410, 503),
                    },
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.0 document"}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "hint": {"type": "string"},
                            },
                        }
                    },
                },
                "Principal": {
                    "type": "object",
                    "properties": {
                        "tenant": {"type": "string"},
                        "tenant_id": {"type": "string", "format": "uuid"},
                        "user": {"type": "string"},
                        "key_id": {"type": "string"},
                    },
                },
                "Recording": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "call_uuid": {"type": "string", "nullable": True},
                        "status": {
                            "type": "string",
                            "enum": ["pending", "stored", "failed", "discarded", "erased"],
                        },
                        "created_at": {"type": "string", "format": "date-time"},
                        "stored_at": {"type": "string", "format": "date-time", "nullable": True},
                        "erased_at": {"type": "string", "format": "date-time", "nullable": True},
                        "size_bytes": {"type": "integer", "nullable": True},
                        "duration_s": {"type": "number", "nullable": True},
                        "sample_rate": {"type": "integer", "nullable": True},
                        "channels": {"type": "integer", "nullable": True},
                        "stream_url": {"type": "string"},
                        "playback_url": {"type": "string"},
                    },
                },
                "PlaybackUrl": {
                    "type": "object",
                    "properties": {
                        "url": {"type": "string"},
                        "expires_at": {"type": "string", "format": "date-time"},
                        "expires_in": {"type": "integer"},
                    },
                },
            },
        },
    }


# --- the application -----------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def _parse_time(name: str, value: str | None) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            f"query parameter {name!r} is not an ISO 8601 date-time",
            code="invalid_parameter",
            hint="Use e.g. 2024-05-01T00:00:00Z.",
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _recording_json(recording: Any) -> dict[str, Any]:
    wav = (recording.encryption_metadata or {}).get("wav") or {}
    base = f"/v1/recordings/{recording.id}"
    return {
        "id": recording.id,
        "call_uuid": recording.call_uuid,
        "status": recording.status,
        "created_at": _iso(recording.created_at),
        "stored_at": _iso(recording.stored_at),
        "erased_at": _iso(recording.erased_at),
        "size_bytes": recording.file_size_bytes,
        "duration_s": wav.get("duration_s"),
        "sample_rate": wav.get("sample_rate"),
        "channels": wav.get("channels"),
        "stream_url": f"{base}/stream",
        "playback_url": f"{base}/playback",
    }


# How a typed error leaves the API: status, stable code, and a fixed public
# message for server-side failures (their own messages name buckets/object keys).
_ERROR_MAP: tuple[tuple[type[FsrecryptError], int, str, str | None], ...] = (
    (RecordingGone, 410, "recording_erased", None),
    (BadRange, 416, "range_not_satisfiable", None),
    (RangeNotSatisfiable, 416, "range_not_satisfiable", None),
    (NotFound, 404, "not_found", None),
    (InvalidState, 409, "recording_not_stored", None),
    (IntegrityError, 500, "integrity_error", "the stored recording failed its integrity check"),
    (ObjectNotFound, 500, "object_missing", "the recording's object is missing from the store"),
    (StorageError, 503, "storage_unavailable", "the object store is unavailable"),
    (KeyAccessError, 503, "key_unavailable", "the recording's key could not be used"),
    (DatabaseError, 503, "database_unavailable", "the database is unavailable"),
)

_PUBLIC_HINTS = {
    "integrity_error": "The failure was logged; the operators must restore the object.",
    "object_missing": "The failure was logged; the operators must restore the object.",
    "storage_unavailable": "Retry later.",
    "key_unavailable": "Retry later; if it persists, the operators must check the key provider.",
    "database_unavailable": "Retry later.",
    "internal_error": "Retry later; the failure was logged.",
}


def classify(exc: BaseException) -> tuple[int, str, str, str]:
    """(status, code, public message, hint) for an exception, leaking no internals."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.message, exc.hint
    if isinstance(exc, ApiAuthError):
        return exc.status, exc.code, exc.message, exc.hint
    for cls, status, code, public in _ERROR_MAP:
        if isinstance(exc, cls):
            if public is not None:
                return status, code, public, _PUBLIC_HINTS[code]
            return status, code, exc.message, exc.hint  # type: ignore[attr-defined]
    return 500, "internal_error", "internal error", _PUBLIC_HINTS["internal_error"]


def create_app(services: Services, *, now: Callable[[], float] = time.time) -> Flask:
    """The Flask application over the daemon's key provider, store and database."""
    from flask import Flask, Response, g, jsonify, request
    from werkzeug.exceptions import HTTPException

    from fsrecrypt import pipeline
    from fsrecrypt.db import USER_AGENT_LIMIT, bounded

    app = Flask("fsrecrypt.web", static_folder=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    playback = services.config.playback
    signer = UrlSigner(load_signing_key(playback.signing_key_file))
    spec = openapi_document()

    def error_response(
        status: int, code: str, message: str, hint: str | None, headers: dict[str, str]
    ) -> Response:
        body = {"error": {"code": code, "message": message}}
        if hint:
            body["error"]["hint"] = hint
        response = jsonify(body)
        response.status_code = status
        response.headers.update(headers)
        return response

    def int_parameter(name: str, raw: str | None, default: int, low: int, high: int) -> int:
        """A query parameter as an ASCII integer in [low, high], or 400 invalid_parameter."""
        if raw is None:
            return default
        try:
            return parse_int(raw, minimum=low, maximum=high)
        except NumberError:
            raise ApiError(
                f"{name} must be an integer between {low} and {high}",
                code="invalid_parameter",
                hint="Use ASCII digits only, e.g. " + f"{name}={default}.",
            ) from None

    def client_ip() -> str | None:
        return request.remote_addr or None

    def user_agent() -> str | None:
        return bounded(request.user_agent.string or None, USER_AGENT_LIMIT)

    def request_path() -> str:
        return bounded(request.path, PATH_LIMIT) or ""

    def audit(
        action: str,
        success: bool,
        *,
        recording: Any = None,
        error: str | None = None,
        details: dict[str, Any] | None = None,
        duration_ms: float | None = None,
        principal: Principal | None = None,
    ) -> None:
        """One access-log row for this request (anonymous refusals: one per minute, counted)."""
        g.audited = True
        who = principal or g.get("principal")
        if recording is None:
            recording = g.get("recording")
        if who is None and recording is None and not success:
            services.db.audit_refusal(
                action=action,
                reason=bounded(error, 100) or "refused",
                ip_address=client_ip(),
                user_agent=user_agent(),
                error_message=error,
                details=details,
            )
            return
        tenant_id = recording.tenant_id if recording is not None else None
        if tenant_id is None and who is not None:
            tenant_id = who.tenant_id
        services.db.audit(
            action=action,
            user_id=who.user_id if who else "anonymous",
            success=success,
            recording_id=recording.id if recording is not None else None,
            tenant_id=tenant_id,
            ip_address=client_ip(),
            user_agent=user_agent(),
            decryption_duration_ms=duration_ms,
            error_message=error,
            details={**(details or {}), **({"key_id": who.key_id, "via": who.via} if who else {})},
        )

    def audit_unaudited_refusal(status: int, code: str) -> None:
        """Every refusal leaves evidence: a row for errors no handler audited itself."""
        if g.get("audited") or status < 400:
            return
        try:
            audit(
                g.get("action", "request"),
                False,
                error=code,
                details={"path": request_path(), "status": status},
            )
        except FsrecryptError as exc:
            log.error("could not write the refusal's access-log row: %s", exc.one_line())

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        audit_unaudited_refusal(exc.code or 500, code)
        return error_response(exc.code or 500, code, exc.description or exc.name, None, {})

    @app.errorhandler(FsrecryptError)
    def typed_error(exc: FsrecryptError) -> Response:
        status, code, message, hint = classify(exc)
        headers = dict(getattr(exc, "headers", {}) or {})
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request_path(), exc.one_line())
        if status == 401:
            headers.setdefault("WWW-Authenticate", f'ApiKey header="{API_KEY_HEADER}"')
        audit_unaudited_refusal(status, code)
        return error_response(status, code, message, hint, headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("%s %s: unexpected error", request.method, request_path())
        status, code, message, hint = classify(exc)
        audit_unaudited_refusal(status, code)
        return error_response(status, code, message, hint, {})

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    def require_key() -> Principal:
        key = request.headers.get(API_KEY_HEADER)
        if not key:
            audit("auth", False, error="missing API key", details={"path": request_path()})
            raise ApiAuthError(
                "an API key is required",
                code="auth_required",
                hint=f"Send the key in the {API_KEY_HEADER} header.",
            )
        try:
            principal = authenticate_api_key(services, key)
        except ApiAuthError as exc:
            audit("auth", False, error=exc.code, details={"path": request_path()})
            raise
        g.principal = principal
        return principal

    def tenant_recording(principal: Principal, recording_id: str, action: str) -> Any:
        """The recording if it belongs to the caller's tenant; 404 (and an audit row) if not.

        A recording of another tenant gets exactly the 404 of an unknown id
        (same body, and the same work: one access-log transaction), and the
        attempt is logged twice in that transaction: in the caller's chain
        (with the id as the caller gave it, as for any unknown id) and in the
        owner's chain with the recording id, so the owner's audit export
        shows who tried to read its recordings.
        """
        found = None
        if _UUID_RE.fullmatch(recording_id):
            with contextlib.suppress(NotFound):
                found = services.db.recording(recording_id.lower())
        if found is None or found.tenant_id != principal.tenant_id:
            requested = bounded(recording_id, REQUESTED_ID_LIMIT)
            common = {
                "action": action,
                "user_id": principal.user_id,
                "success": False,
                "ip_address": client_ip(),
                "user_agent": user_agent(),
                "error_message": "not_found",
            }
            rows: list[dict[str, Any]] = [
                {
                    **common,
                    "tenant_id": principal.tenant_id,
                    "details": {
                        "requested_id": requested,
                        "key_id": principal.key_id,
                        "via": principal.via,
                    },
                }
            ]
            if found is not None:
                rows.append(
                    {
                        **common,
                        "tenant_id": found.tenant_id,
                        "recording_id": found.id,
                        "error_message": "cross_tenant_refused",
                        "details": {
                            "caller_tenant_id": principal.tenant_id,
                            "key_id": principal.key_id,
                            "via": principal.via,
                            "answered": 404,
                        },
                    }
                )
            g.audited = True
            services.db.audit_together(rows)
            raise NotFound(
                f"no recording {requested} for this tenant",
                hint="List the tenant's recordings with GET /v1/recordings.",
            )
        g.recording = found
        return found

    def usable(recording: Any, action: str) -> None:
        if recording.status == "erased":
            audit(action, False, recording=recording, error="recording_erased")
            raise RecordingGone(f"recording {recording.id} was erased")
        if recording.status != "stored":
            audit(action, False, recording=recording, error=f"status {recording.status}")
            raise InvalidState(
                f"recording {recording.id} is {recording.status}, not stored",
                hint="Only stored recordings can be played; retry once it is stored.",
            )

    # -- pages and documents ---------------------------------------------------------------

    def static_file(name: str, mimetype: str) -> Response:
        data = resources.files("fsrecrypt").joinpath(STATIC_DIR, name).read_bytes()
        response = Response(data, mimetype=mimetype)
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "media-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/")
    def index() -> Response:
        return static_file("index.html", "text/html")

    @app.get("/app.js")
    def app_js() -> Response:
        return static_file("app.js", "text/javascript")

    @app.get("/app.css")
    def app_css() -> Response:
        return static_file("app.css", "text/css")

    @app.get("/v1/openapi.json")
    def openapi() -> Response:
        response = jsonify(spec)
        response.headers["Cache-Control"] = "no-cache"
        return response

    # -- API -------------------------------------------------------------------------------

    @app.get("/v1/me")
    def me() -> Response:
        p = require_key()
        return jsonify(
            {
                "tenant": p.tenant_name,
                "tenant_id": p.tenant_id,
                "user": p.user_id,
                "key_id": p.key_id,
            }
        )

    @app.get("/v1/recordings")
    def list_recordings() -> Response:
        g.action = "list"
        principal = require_key()
        args = request.args
        limit = int_parameter("limit", args.get("limit"), DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
        rows = services.db.recordings(
            tenant_id=principal.tenant_id,
            call_uuid=args.get("call_uuid") or None,
            created_from=_parse_time("from", args.get("from")),
            created_to=_parse_time("to", args.get("to")),
            limit=limit,
        )
        return jsonify({"recordings": [_recording_json(r) for r in rows]})

    @app.get("/v1/recordings/<recording_id>")
    def get_recording(recording_id: str) -> Response:
        g.action = "metadata"
        principal = require_key()
        return jsonify(_recording_json(tenant_recording(principal, recording_id, "metadata")))

    @app.get("/v1/recordings/<recording_id>/playback")
    def playback_url(recording_id: str) -> Response:
        g.action = "playback_url"
        principal = require_key()
        recording = tenant_recording(principal, recording_id, "playback_url")
        usable(recording, "playback_url")
        ttl = int_parameter("ttl", request.args.get("ttl"), playback.url_ttl, 1, playback.url_ttl)
        expires = int(now()) + ttl
        query = signer.query(recording.id, principal, expires)
        url = f"/v1/recordings/{recording.id}/stream?" + "&".join(
            f"{k}={v}" for k, v in query.items()
        )
        expires_at = datetime.fromtimestamp(expires, UTC).isoformat()
        audit("playback_url", True, recording=recording, details={"expires_at": expires_at})
        return jsonify({"url": url, "expires_at": expires_at, "expires_in": ttl})

    @app.route("/v1/recordings/<recording_id>/stream", methods=["GET", "HEAD"])
    def stream(recording_id: str) -> Response:
        g.action = "stream"
        started = time.monotonic()
        if "sig" in request.args and not request.headers.get(API_KEY_HEADER):
            try:
                principal = signer.verify(
                    services, recording_id.lower(), dict(request.args.items()), now()
                )
            except ApiAuthError as exc:
                audit(
                    "stream",
                    False,
                    error=exc.code,
                    details={
                        "requested_id": bounded(recording_id, REQUESTED_ID_LIMIT),
                        "path": request_path(),
                    },
                )
                raise
            g.principal = principal
        else:
            principal = require_key()
        recording = tenant_recording(principal, recording_id, "stream")
        usable(recording, "stream")
        size = recording.file_size_bytes or 0
        try:
            wanted = parse_range(request.headers.get("Range"), size)
        except BadRange as exc:
            audit(
                "stream",
                False,
                recording=recording,
                error="range_not_satisfiable",
                details={"range_header": bounded(request.headers.get("Range") or "", RANGE_LIMIT)},
            )
            exc.headers = {"Content-Range": f"bytes */{size}"}  # type: ignore[attr-defined]
            raise
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{recording.id}.wav"',
            "Cache-Control": "private, no-store",
        }
        if request.method == "HEAD":
            response = Response(b"", mimetype="audio/wav", headers=headers)
            response.headers["Content-Length"] = str(size)
            return response
        start, end = (0, size) if wanted is None else wanted
        range_details = {"range": {"start": start, "end": end - 1 if end else None, "size": size}}
        agent = user_agent()
        ip = client_ip()
        try:
            if wanted is None:
                chunks = _full_plaintext(services, recording)
            else:
                opened = pipeline.open_recording(services, recording)
                _plan, chunks = pipeline.iter_plaintext_range(services, opened, start, end)
            # The first frame is authenticated before the status line goes out,
            # so a bad header or first frame is a clean JSON error, not a cut stream.
            first = next(chunks, b"")
        except FsrecryptError as exc:
            # The row names the failure's class as the caller sees it
            # (integrity_error, key_unavailable, ...), so tampering and a
            # swapped object are told apart from outages in the audit log.
            audit(
                "stream",
                False,
                recording=recording,
                error=f"{type(exc).__name__}: {exc.message}",
                details={**range_details, "error_code": classify(exc)[1]},
                duration_ms=(time.monotonic() - started) * 1000,
            )
            raise
        body = _AuditedStream(
            first,
            chunks,
            expected=end - start,
            on_close=lambda sent, error, completed: services.db.audit(
                action="stream",
                user_id=principal.user_id,
                success=error is None,
                recording_id=recording.id,
                tenant_id=recording.tenant_id,
                ip_address=ip,
                user_agent=agent,
                decryption_duration_ms=(time.monotonic() - started) * 1000,
                error_message=error,
                details={
                    **range_details,
                    "bytes_sent": sent,
                    "completed": completed,
                    "key_id": principal.key_id,
                    "via": principal.via,
                },
            ),
        )
        status = 200 if wanted is None else 206
        response = Response(
            body, status=status, mimetype="audio/wav", headers=headers, direct_passthrough=True
        )
        response.headers["Content-Length"] = str(end - start)
        if wanted is not None:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return response

    return app


FULL_READ_BATCH = 2 << 20
"""Ciphertext per decryption batch on a full read. Each batch costs the relay
thread a thread-pool round trip (wake-ups, a futex or two) and one ``sendall``;
at 2 MiB a 60-minute recording is ~28 of them. Larger batches bought no more
in the benchmark and only delay the first byte (a batch is read and verified
before it goes out)."""


def _full_plaintext(services: Services, recording: Any) -> Iterator[bytes]:
    """The whole recording for ``/stream``: one GET, decryption overlapped with the sockets.

    Why not ``open_recording`` + ``iter_plaintext``: that costs a HEAD, a
    ranged GET for the header and then the GET of the body, one after the
    other, before the first byte. Here the body's GET starts at once (the
    HEAD, needed only for the size check, runs beside it) and the header is
    read from the body itself. The checks are those of ``open_recording``:
    the header's context must name this recording and tenant, the data key
    is unwrapped from the database's copy under that context, commitment and
    header tag are verified with it, and the object's size must give the
    row's plaintext size, all before any frame is decrypted.

    Frames are then authenticated in batches of ``FULL_READ_BATCH`` in
    gevent's thread pool (AES-GCM releases the GIL), so decryption runs
    while the hub reads S3 and writes to the client. The body is read
    straight into each batch's buffer (``IterReader`` -> the store body's
    ``readinto``), and a batch's plaintext goes to the socket as one chunk.
    A batch is released only once every frame in it verified; the output is
    also held to exactly the row's size, so a body that changed under us
    ends the stream instead of overrunning the promised Content-Length.
    """
    import gevent

    from fsrecrypt import format as esdk
    from fsrecrypt import pipeline

    key = pipeline.check_readable(recording)
    store = services.store

    def head() -> Any:
        try:
            return store.head(key)
        except FsrecryptError as exc:  # handed to the reader, not printed by gevent
            return exc

    sizing = gevent.spawn(head)
    try:
        body = store.get_range(key, 0, None)
    except BaseException:
        sizing.kill()
        raise

    def data_key_for(header: Any) -> bytes:
        data_key = pipeline.unwrap_data_key(services, recording, header)
        info = sizing.get()
        if isinstance(info, FsrecryptError):
            raise info
        pipeline.checked_plaintext_size(recording, header, info.size)
        return data_key

    pool = gevent.get_hub().threadpool

    def submit(job: Callable[[], bytes]) -> Callable[[], bytes]:
        return pool.spawn(job).get  # type: ignore[no-any-return]

    def exactly(expected: int | None) -> Iterator[bytes]:
        sent = 0
        producer = None
        try:
            plaintext = esdk.decrypt_stream_batched(
                pipeline.IterReader(body), data_key_for, submit, batch_bytes=FULL_READ_BATCH
            )
            producer, plaintext = _read_ahead(plaintext)
            for chunk in plaintext:
                sent += len(chunk)
                if expected is not None and sent > expected:
                    raise MalformedMessage(
                        f"object {key} holds more audio than the row's {expected} bytes"
                    )
                yield chunk
            if expected is not None and sent != expected:
                raise MalformedMessage(
                    f"object {key} ended after {sent} of the row's {expected} bytes"
                )
        except FsrecryptError:
            # The object failed a read: a header cached for seeks must not outlive that.
            services.headers.drop(key)
            raise
        finally:
            if producer is not None:
                producer.kill()
            sizing.kill()
            close = getattr(body, "close", None)
            if close is not None:
                close()

    return exactly(recording.file_size_bytes)


_END = object()


def _read_ahead(chunks: Iterator[bytes]) -> tuple[Any, Iterator[bytes]]:
    """Run ``chunks`` in its own greenlet, one chunk ahead of the consumer.

    Why: in one greenlet, reading S3 and writing to the client take turns:
    while ``sendall`` waits for the client to drain a batch, nothing receives
    from S3, and while a batch is being received nothing is sent. With the
    producer in its own greenlet the hub does both as the sockets allow
    (a few percent more throughput in ``bench/bench_stream.py``, no more CPU),
    for one more batch of plaintext held per stream.

    Nothing changes in what goes out: the producer forwards only what
    ``chunks`` yields (verified plaintext), in order, then its error if it
    raised one. Returns the greenlet (kill it when done with the stream: that
    also closes ``chunks``) and the iterator to consume.
    """
    import gevent
    from gevent.queue import Queue

    queue: Any = Queue(maxsize=1)

    def produce() -> None:
        try:
            for chunk in chunks:
                queue.put(chunk)
        except Exception as exc:  # noqa: BLE001 - not swallowed: re-raised by the consumer
            queue.put(exc)
            return
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        queue.put(_END)

    producer = gevent.spawn(produce)

    def consume() -> Iterator[bytes]:
        while True:
            item = queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    return producer, consume()


class StreamAborted(IntegrityError):
    """An integrity failure after the status line went out: the connection must be cut."""


class _AuditedStream:
    """The response body: releases authenticated plaintext and writes one audit row at the end.

    The row is written when the server closes the body, whichever way it
    ends: completed, cut by the client (a seek makes browsers drop the old
    request), or aborted on an integrity failure. In the last case the error
    is re-raised as StreamAborted so the WSGI server drops the connection:
    the client sees a short body (Content-Length was promised), never
    unauthenticated bytes.
    """

    def __init__(
        self,
        first: bytes,
        rest: Iterator[bytes],
        *,
        expected: int,
        on_close: Callable[[int, str | None, bool], None],
    ) -> None:
        self._first = first
        self._rest = rest
        self._expected = expected
        self._on_close = on_close
        self._sent = 0
        self._error: str | None = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._first:
                self._sent += len(self._first)
                yield self._first
            self._first = b""
            for chunk in self._rest:
                self._sent += len(chunk)
                yield chunk
        except FsrecryptError as exc:
            self._error = f"{type(exc).__name__}: {exc.message}"
            log.error("stream aborted after %d bytes: %s", self._sent, exc.one_line())
            self.close()
            raise StreamAborted(f"stream aborted after {self._sent} bytes: {exc.message}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._rest, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        completed = self._error is None and self._sent == self._expected
        try:
            self._on_close(self._sent, self._error, completed)
        except FsrecryptError as exc:
            log.error("could not write the stream's access-log row: %s", exc.one_line())


# --- serving ------------------------------------------------------------------------------


_SENSITIVE_PARAMS = frozenset(
    {"sig", "signature", "token", "access_token", "api_key", "apikey", "key", "x-api-key"}
)
_QUERY_PARAM_RE = re.compile(r"([?&;])([^=&;\s\"]*)=([^&;\s\"]*)")
_KEY_IN_TEXT_RE = re.compile(r"fsr_([0-9a-f]{16})_[A-Za-z0-9_-]+")
LOG_LINE_LIMIT = 2048


def redact(text: str) -> str:
    """``text`` safe for a log line: no signature, API key or token, no control characters.

    Why: a signed playback URL is a bearer credential until it expires, and
    the access log (request line with its query) is read by more people than
    may play recordings. Query parameters named like a credential (also when
    percent-encoded) keep their name and lose their value; anything shaped
    like an API key anywhere in the line keeps only its public id. Control
    characters are escaped (no forged log lines) and the line is bounded.
    """
    from urllib.parse import unquote

    def param(match: re.Match[str]) -> str:
        if unquote(match[2]).lower() in _SENSITIVE_PARAMS:
            return f"{match[1]}{match[2]}=[redacted]"
        return match[0]

    text = _QUERY_PARAM_RE.sub(param, text)
    text = _KEY_IN_TEXT_RE.sub(r"fsr_\1_[redacted]", text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    if len(text) > LOG_LINE_LIMIT:
        text = text[:LOG_LINE_LIMIT] + f"...[{len(text)} chars, truncated]"
    return text


class RedactingFilter(logging.Filter):
    """Applies :func:`redact` to every record of the server's access and error logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections ``fsrecrypt serve`` holds, and how long it waits for a request."""

    max_connections: int = 1000
    max_connections_per_client: int = 64
    header_timeout: float = 10.0
    idle_timeout: float = 30.0


FD_HEADROOM = 128
"""Descriptors kept free beside the connections: database pool, store and key
clients, log files, and connections accepted in one loop turn before older
ones are closed."""


def raise_nofile_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit; return the soft limit.

    Why: the default soft limit (often 1024) is what made the server log
    "Too many open files" and stop accepting anyone; the hard limit is what
    the administrator granted (systemd LimitNOFILE=).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limits(playback: Any, *, nofile: int, reserved: int) -> ConnectionLimits:
    """The configured limits, with max_connections lowered to fit the open-files limit."""
    room = nofile - FD_HEADROOM - reserved
    if room < 1:
        raise ConfigError(
            f"the open-files limit ({nofile}) leaves no room for connections",
            hint="Raise LimitNOFILE= in the systemd unit (or ulimit -n).",
        )
    wanted = playback.max_connections
    if wanted > room:
        log.warning(
            "open-files limit %d allows %d connections, not the configured %d; lowered",
            nofile,
            room,
            wanted,
        )
    total = min(wanted, room)
    return ConnectionLimits(
        max_connections=total,
        max_connections_per_client=min(playback.max_connections_per_client, total),
        header_timeout=playback.header_timeout,
        idle_timeout=playback.idle_timeout,
    )


_BUSY_BODY = json.dumps(
    {
        "error": {
            "code": "too_many_connections",
            "message": "the server holds its maximum of connections",
            "hint": "Retry in a moment.",
        }
    }
).encode("ascii")
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode("ascii")
    + b"\r\n\r\n"
    + _BUSY_BODY
)


def _handler_class() -> type:
    """gevent's WSGI handler: typed errors cut the connection, request deadlines, redacted log.

    Deadlines: a new connection must deliver its request line and headers
    within ``header_timeout`` seconds, a kept-alive one within ``idle_timeout``
    of its previous response (slow-header clients cannot hold a connection).
    While it waits for a request the connection is evictable (see
    :func:`_server_class`); from the end of its headers to the end of its
    response it is busy and never evicted.
    """
    import gevent
    from gevent.pywsgi import WSGIHandler

    class Handler(WSGIHandler):  # type: ignore[misc]
        _deadline: Any = None
        _served = 0

        def handle_error(self, t: Any, v: Any, tb: Any) -> None:
            if isinstance(v, FsrecryptError):
                # Already logged and audited by the app: drop the connection
                # (nothing, or a body shorter than its Content-Length, went out).
                self.close_connection = True
                return
            super().handle_error(t, v, tb)

        def handle(self) -> None:
            try:
                super().handle()
            except gevent.Timeout as timeout:
                if timeout is not self._deadline:
                    raise
                # the request did not arrive in time; the socket is closed already
            finally:
                self._stop_deadline()

        def _stop_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.close()

        def read_requestline(self) -> str:
            limits = getattr(self.server, "limits", None)
            if limits is not None:
                self.server.connection_waiting(True)
                seconds = limits.idle_timeout if self._served else limits.header_timeout
                self._stop_deadline()
                self._deadline = gevent.Timeout(seconds)
                self._deadline.start()
            try:
                line = super().read_requestline()
            except BaseException:
                self._stop_deadline()
                raise
            if not line:
                self._stop_deadline()
            return line  # type: ignore[no-any-return]

        def read_request(self, raw_requestline: str) -> Any:
            try:
                return super().read_request(raw_requestline)
            finally:
                self._stop_deadline()
                self._served += 1
                if getattr(self.server, "limits", None) is not None:
                    self.server.connection_waiting(False)

        def format_request(self) -> str:
            return redact(super().format_request())

    return Handler


def _server_class() -> type:
    """gevent's WSGIServer with a cap on connections, per server and per client address.

    A new connection over a cap is admitted by closing a connection that is
    still waiting for its request (from the client holding the most such
    connections, oldest first): slow or idle clients give way, and one
    address (or many addresses) opening thousands of half-sent requests
    cannot keep a legitimate request out. When every connection is busy the
    newcomer gets an immediate 503 instead. Waiting is bounded by the
    handler's header and idle deadlines anyway.
    """
    import gevent
    from gevent.pywsgi import WSGIServer

    class LimitedServer(WSGIServer):  # type: ignore[misc]
        def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.limits = limits
            self._live: dict[Any, str] = {}  # greenlet -> client address
            self._per_client: dict[str, int] = {}
            self._waiting: dict[str, dict[Any, None]] = {}  # client -> waiting greenlets
            self.refused = 0
            self.evicted = 0
            self._last_warning = 0.0

        @property
        def open_connections(self) -> int:
            return len(self._live)

        def connection_waiting(self, waiting: bool) -> None:
            """Called by the handler: its connection waits for a request (evictable) or not."""
            me = gevent.getcurrent()
            client = self._live.get(me)
            if client is None:
                return
            queue = self._waiting.setdefault(client, {})
            queue.pop(me, None)
            if waiting:
                queue[me] = None
            elif not queue:
                del self._waiting[client]

        def _forget(self, greenlet: Any) -> None:
            client = self._live.pop(greenlet, None)
            if client is None:
                return
            left = self._per_client.get(client, 1) - 1
            if left > 0:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)
            queue = self._waiting.get(client)
            if queue is not None:
                queue.pop(greenlet, None)
                if not queue:
                    del self._waiting[client]

        def _evict(self, client: str | None) -> bool:
            if client is None:
                if not self._waiting:
                    return False
                client = max(self._waiting, key=lambda c: len(self._waiting[c]))
            queue = self._waiting.get(client)
            if not queue:
                return False
            victim = next(iter(queue))
            self._forget(victim)
            victim.kill(block=False)
            self.evicted += 1
            return True

        def _admit(self, client: str) -> bool:
            if self._per_client.get(client, 0) >= self.limits.max_connections_per_client:
                if not self._evict(client):
                    return False
            if len(self._live) >= self.limits.max_connections:
                return self._evict(None)
            return True

        def _refuse(self, sock: Any, client: str) -> None:
            self.refused += 1
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning(
                    "connection limit reached (%d open, %d refused so far); refused %s",
                    len(self._live),
                    self.refused,
                    client,
                )
            with contextlib.suppress(OSError):
                sock.settimeout(1)
                sock.sendall(_BUSY_RESPONSE)
            with contextlib.suppress(OSError):
                sock.close()

        def handle(self, sock: Any, address: Any) -> None:
            client = str(address[0]) if isinstance(address, tuple) and address else "local"
            if not self._admit(client):
                self._refuse(sock, client)
                return
            me = gevent.getcurrent()
            self._live[me] = client
            self._per_client[client] = self._per_client.get(client, 0) + 1
            try:
                super().handle(sock, address)
            finally:
                self._forget(me)
                with contextlib.suppress(OSError):
                    sock.close()

    return LimitedServer


def make_server(app: Any, config: Any, listen: str | None = None) -> Any:
    """The playback server (not started) on ``listen`` or [playback] listen, limits applied."""
    nofile = raise_nofile_limit()
    db_pool = max(4, config.pipeline.concurrency + 2)  # as pipeline.Services sizes it
    limits = connection_limits(config.playback, nofile=nofile, reserved=db_pool)
    host, port = _split_listen(listen or config.playback.listen)
    access = logging.getLogger("fsrecrypt.web.access")
    errors = logging.getLogger("fsrecrypt.web.error")
    for logger in (access, errors):
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
    return _server_class()(
        (host, port),
        app,
        handler_class=_handler_class(),
        log=access,
        error_log=errors,
        limits=limits,
    )


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.command("serve")
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="FILE",
    envvar="FSRECRYPT_CONFIG",
    default=None,
    help="Configuration file.",
)
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Address to listen on (default: [playback] listen).",
)
@click.pass_context
def serve_command(ctx: click.Context, config_path: str | None, listen: str | None) -> None:
    """Serve the playback API and page (streaming decryption with seek)."""
    from gevent import monkey

    monkey.patch_all()
    import signal

    import gevent

    from fsrecrypt import db as dbmod
    from fsrecrypt.config import with_overrides
    from fsrecrypt.pipeline import Services

    config = _load(ctx, config_path)
    if listen:
        config = with_overrides(config, playback={"listen": listen})
    _configure_logging(config.logging.level)
    dbmod.enable_gevent()
    services = Services(config)
    services.db.ping()
    app = create_app(services)
    server = make_server(app, config)
    server.start()
    bound_host, bound_port = server.address[:2]
    click.echo(f"fsrecrypt serve: listening on http://{bound_host}:{bound_port}/", err=True)

    def stop() -> None:
        log.info("stopping")
        server.stop(timeout=config.pipeline.shutdown_grace)

    gevent.signal_handler(signal.SIGTERM, stop)
    gevent.signal_handler(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        services.close()


def _load(ctx: click.Context, config_path: str | None) -> Any:
    """The config from -c (here or on the group), $FSRECRYPT_CONFIG, or the default path."""
    from fsrecrypt.cli import State
    from fsrecrypt.config import load_config

    if config_path is None:
        state = ctx.find_object(State)
        config_path = state.config_path if state is not None else None
    return load_config(config_path)


def _services(ctx: click.Context, config_path: str | None) -> Services:
    from fsrecrypt.pipeline import Services

    return Services(_load(ctx, config_path))


_config_opt = click.option(
    "-c",
    "--config",
    "config_path",
    metavar="FILE",
    envvar="FSRECRYPT_CONFIG",
    default=None,
    help="Configuration file.",
)


@click.group("apikeys")
def apikeys_group() -> None:
    """Manage the playback API keys (stored only as hashes)."""


@apikeys_group.command("create")
@_config_opt
@click.option("--tenant", "tenant_name", required=True, help="Tenant the key may read.")
@click.option("--user", "user_id", required=True, help="User id recorded in the access log.")
@click.pass_context
def apikeys_create(
    ctx: click.Context, config_path: str | None, tenant_name: str, user_id: str
) -> None:
    """Create a key for USER of TENANT and print it once (only its hash is kept)."""
    services = _services(ctx, config_path)
    try:
        row, key = create_api_key(services, tenant_name, user_id)
    except AlreadyExists:  # a 64-bit key id collision: vanishingly rare, just retry once
        row, key = create_api_key(services, tenant_name, user_id)
    finally:
        services.close()
    click.echo(key)
    click.echo(
        f"key id {row.key_id} for user {row.user_id!r} of tenant {row.tenant_name!r}; "
        "store the key now, it cannot be shown again",
        err=True,
    )


@apikeys_group.command("list")
@_config_opt
@click.option("--tenant", "tenant_name", default=None, help="Only this tenant's keys.")
@click.pass_context
def apikeys_list(ctx: click.Context, config_path: str | None, tenant_name: str | None) -> None:
    """List key ids, users and state (never the keys)."""
    services = _services(ctx, config_path)
    try:
        rows = list_api_keys(services, tenant_name)
    finally:
        services.close()
    for r in rows:
        state = f"revoked {_iso(r.revoked_at)}" if r.revoked_at else "active"
        click.echo(
            json.dumps(
                {
                    "key_id": r.key_id,
                    "tenant": r.tenant_name,
                    "user": r.user_id,
                    "created_at": _iso(r.created_at),
                    "last_used_at": _iso(r.last_used_at),
                    "state": state,
                }
            )
        )


@apikeys_group.command("revoke")
@_config_opt
@click.argument("key_id")
@click.pass_context
def apikeys_revoke(ctx: click.Context, config_path: str | None, key_id: str) -> None:
    """Revoke KEY_ID at once (its signed playback URLs stop working too)."""
    services = _services(ctx, config_path)
    try:
        row = revoke_api_key(services, key_id)
    finally:
        services.close()
    click.echo(f"revoked key {row.key_id} of user {row.user_id!r} (tenant {row.tenant_name!r})")
