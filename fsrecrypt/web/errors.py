"""How a failure leaves the API: an HTTP status, a stable machine code, no internals.

The typed errors of :mod:`fsrecrypt.errors` keep their meaning across the
API; server-side failures get a fixed public message because their own
messages name buckets, object keys and hosts.
"""

from __future__ import annotations

from fsrecrypt.errors import (
    AuthError,
    DatabaseError,
    FsrecryptError,
    IntegrityError,
    InvalidState,
    KeyAccessError,
    NotFound,
    ObjectNotFound,
    RangeNotSatisfiable,
    RecordingGone,
    StorageError,
)
from fsrecrypt.web.ranges import BadRange


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
