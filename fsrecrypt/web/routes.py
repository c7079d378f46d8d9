"""The API, route by route: the one table the Flask app registers and the document describes.

Each :class:`Route` names its method and path, its parameters with their
types and bounds, its answers (with the typed body of :mod:`.schemas`) and
the error statuses it can give. :func:`fsrecrypt.web.app.create_app` adds one
URL rule per route and hands the view only the parameters declared here
(reading any other is a bug, see :class:`fsrecrypt.web.app.Params`);
:func:`fsrecrypt.web.openapi.openapi_document` writes the same table out as
OpenAPI 3.0. Written here rather than with apispec: the table is small, and
apispec would still need the schemas and parameters spelled out by hand.

Who may call a route is part of the table too: ``security`` says how the
caller authenticates (``public``: nobody needs to), ``roles`` which roles of
:data:`fsrecrypt.web.auth.ROLES` it must hold (any one of them; empty: any
authenticated caller). ``create_app`` authenticates and checks the roles
*before* the view runs (``Access.authorize``): a caller without the role gets
403 ``forbidden_role`` and an access-log row, and the view reads the caller
from ``Access.principal()`` (DEVELOPERS.md: "A new API route").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fsrecrypt.web import schemas
from fsrecrypt.web.auth import Role

MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100

Kind = Literal["string", "uuid", "integer", "date-time", "boolean"]
Security = Literal["api_key", "api_key_or_signed_url", "public"]
"""``api_key``: X-API-Key or a bearer token (the name predates tokens); ``..._or_signed_url``:
either of those or a signed URL from /playback; ``public``: no credentials."""
Method = Literal["GET", "POST", "DELETE"]
ON_BEHALF_OF_HEADER = "X-On-Behalf-Of"


@dataclass(frozen=True)
class Param:
    """One request parameter: where it is, what it holds, its bounds."""

    name: str
    location: Literal["path", "query", "header"]
    kind: Kind = "string"
    description: str | None = None
    minimum: int | None = None
    maximum: int | None = None
    default: int | None = None


@dataclass(frozen=True)
class Answer:
    """A success answer: its status, and a typed JSON body or a media type (binary or page)."""

    status: int
    description: str
    body: type | None = None
    media_type: str = "application/json"


@dataclass(frozen=True)
class Body:
    """A request body: a typed JSON object (a dataclass of :mod:`.schemas`) or raw media.

    ``schema`` describes ``application/json`` (or ``multipart/form-data``)
    bodies field by field; for raw media (``audio/*``) leave it None.
    """

    description: str
    schema: type | None = None
    media_types: tuple[str, ...] = ("application/json",)
    required: bool = True


@dataclass(frozen=True)
class Route:
    method: Method
    path: str
    operation_id: str
    summary: str
    view: str
    answers: tuple[Answer, ...]
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    security: Security = "api_key"
    description: str | None = None
    roles: tuple[Role, ...] = ()
    """Any one of these roles is required (checked before the view); empty: any caller."""
    body: Body | None = None
    error_notes: tuple[tuple[int, str], ...] = ()
    """What an error status means for this route, where the general description does not fit."""

    @property
    def rule(self) -> str:
        """The Flask URL rule: ``{id}`` becomes ``<id>``."""
        return re.sub(r"\{(\w+)\}", r"<\1>", self.path)

    @property
    def all_params(self) -> tuple[Param, ...]:
        """The declared parameters plus ``X-On-Behalf-Of`` (read by every authenticated route)."""
        if self.security == "public":
            return self.params
        return (*self.params, ON_BEHALF_OF)

    @property
    def statuses(self) -> tuple[int, ...]:
        """The error statuses: the declared ones, plus 401/403 that authentication can give."""
        extra = () if self.security == "public" else (401, 403)
        return tuple(sorted({*self.errors, *extra}))


ON_BEHALF_OF = Param(
    ON_BEHALF_OF_HEADER,
    "header",
    description=(
        "The end user a service key acts for (only keys created with --on-behalf-of); "
        "the access log records both"
    ),
)
READ_ROLES: tuple[Role, ...] = ("listen", "download", "admin")
"""Who may list recordings and read their metadata."""
RECORDING_ID = Param("id", "path", "uuid")
SIGNED_URL = (
    Param("kid", "query", description="Signed URL: the issuing API key id ('jwt' for a token)"),
    Param("exp", "query", description="Signed URL: expiry (Unix seconds)"),
    Param("sig", "query", description="Signed URL: HMAC-SHA256 signature"),
    Param(
        "who",
        "query",
        description="Signed URL: the principal (bearer token or end user of a service key)",
    ),
)
AUDIO = "audio/wav"


def _page(path: str, operation_id: str, summary: str, view: str, media_type: str) -> Route:
    return Route(
        "GET",
        path,
        operation_id,
        summary,
        view,
        answers=(Answer(200, summary, media_type=media_type),),
        security="public",
    )


REASON = Body("Why: a case, matter or ticket number", schemas.HoldRequest)
ADMIN_ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/recordings/{id}/custody",
        "recordingCustody",
        "The recording's chain of custody (what 'fsrecrypt custody ID' prints)",
        "custody",
        description=(
            "Creation, storage, keyed fingerprint, plaintext deletion, and every access, "
            "rotation, hold and erasure with its audit row id and covering anchor. "
            "Logged as action 'custody'."
        ),
        params=(RECORDING_ID,),
        answers=(Answer(200, "The custody document (as 'fsrecrypt custody' prints it)"),),
        errors=(404, 503),
        roles=("admin",),
    ),
    Route(
        "POST",
        "/v1/recordings/{id}/holds",
        "addLegalHold",
        "Place a legal hold (as 'fsrecrypt hold add'): the recording cannot be erased",
        "hold_add",
        description="Idempotent: a recording already on hold keeps its hold. Logged as hold_add.",
        params=(RECORDING_ID,),
        body=REASON,
        answers=(Answer(200, "Per recording: held, already held", schemas.HoldResults),),
        errors=(400, 404, 409, 503),
        error_notes=((409, "The recording was erased: nothing is left to hold"),),
        roles=("admin",),
    ),
    Route(
        "POST",
        "/v1/recordings/{id}/holds/release",
        "releaseLegalHold",
        "Release the legal hold (as 'fsrecrypt hold remove'); the hold stays as history",
        "hold_release",
        description="409 no_active_hold if the recording is not on hold. Logged as hold_remove.",
        params=(RECORDING_ID,),
        body=Body("Why the hold ends", schemas.HoldRequest),
        answers=(Answer(200, "Per recording: released", schemas.HoldResults),),
        errors=(400, 404, 409, 503),
        error_notes=((409, "The recording is not on hold (no_active_hold)"),),
        roles=("admin",),
    ),
    Route(
        "POST",
        "/v1/recordings/{id}/erase",
        "eraseRecording",
        "Erase the recording for good (crypto-shredding, as 'fsrecrypt erase')",
        "erase",
        description=(
            "Destroys the wrapped data key and every version of the object and answers the "
            "deletion receipt. Refused (409, nothing destroyed) under a legal hold "
            "(legal_hold_active), inside the retention period unless override_retention "
            "(retention_active), or under S3 Object Lock retention "
            "(storage_retention_locked). Logged as erase."
        ),
        params=(RECORDING_ID,),
        body=Body("Why, and whether to erase inside retention", schemas.EraseRequest),
        answers=(Answer(200, "The deletion receipt (as 'fsrecrypt erase' prints it)"),),
        errors=(400, 404, 409, 503),
        error_notes=(
            (409, "Refused, nothing destroyed: legal hold, retention, storage lock, or pending"),
            (503, "A backing service is unavailable, or erasure_incomplete: retry the same call"),
        ),
        roles=("admin",),
    ),
)
"""The ``admin`` role's routes (:mod:`fsrecrypt.web.admin`): the CLI's rules, rows and receipts."""

ROUTES: tuple[Route, ...] = (
    _page("/", "playerPage", "The playback page", "index", "text/html"),
    _page("/app.js", "playerScript", "The playback page's script", "app_js", "text/javascript"),
    _page("/app.css", "playerStyle", "The playback page's style sheet", "app_css", "text/css"),
    Route(
        "GET",
        "/v1/openapi.json",
        "openapi",
        "This document",
        "openapi",
        answers=(Answer(200, "OpenAPI 3.0 document"),),
        security="public",
    ),
    Route(
        "GET",
        "/v1/me",
        "whoAmI",
        "The tenant and user behind the API key",
        "me",
        answers=(Answer(200, "The caller", schemas.Principal),),
        errors=(401,),
    ),
    Route(
        "GET",
        "/v1/recordings",
        "listRecordings",
        "The tenant's recordings, oldest first",
        "list_recordings",
        params=(
            Param("call_uuid", "query"),
            Param("from", "query", "date-time", "Created at or after (ISO 8601; UTC if no offset)"),
            Param("to", "query", "date-time", "Created before (ISO 8601; UTC if no offset)"),
            Param(
                "limit",
                "query",
                "integer",
                minimum=1,
                maximum=MAX_LIST_LIMIT,
                default=DEFAULT_LIST_LIMIT,
            ),
        ),
        answers=(Answer(200, "Matching recordings", schemas.RecordingList),),
        errors=(400, 401, 503),
        roles=READ_ROLES,
    ),
    Route(
        "GET",
        "/v1/recordings/{id}",
        "getRecording",
        "One recording's metadata",
        "get_recording",
        params=(RECORDING_ID,),
        answers=(Answer(200, "The recording", schemas.Recording),),
        errors=(401, 404, 503),
        roles=(*READ_ROLES, "ingest"),
    ),
    Route(
        "GET",
        "/v1/recordings/{id}/stream",
        "streamRecording",
        "The decrypted audio (audio/wav), with single-range support",
        "stream",
        description=(
            "Authenticated by X-API-Key or by a signed URL from /playback. Each "
            "frame is authenticated before its bytes are sent; an integrity failure "
            "mid-stream aborts the connection. Audited as action 'stream' with the "
            "byte range. HEAD answers the headers (size) without decrypting."
        ),
        security="api_key_or_signed_url",
        params=(
            RECORDING_ID,
            Param("Range", "header", description="bytes=START-END, bytes=START- or bytes=-SUFFIX"),
            *SIGNED_URL,
        ),
        answers=(
            Answer(200, "The whole recording", media_type=AUDIO),
            Answer(206, "The requested range (Content-Range)", media_type=AUDIO),
        ),
        errors=(401, 403, 404, 409, 410, 416, 500, 503),
        roles=("listen",),
    ),
    Route(
        "GET",
        "/v1/recordings/{id}/download",
        "downloadRecording",
        "The whole decrypted recording as a file (Content-Disposition: attachment)",
        "download",
        description=(
            "The whole file, for saving (no Range). Each frame is authenticated before its "
            "bytes are sent; an integrity failure mid-file aborts the connection. Audited as "
            "action 'download' (not 'stream'). HEAD answers the headers without decrypting."
        ),
        params=(RECORDING_ID,),
        answers=(Answer(200, "The whole recording", media_type=AUDIO),),
        errors=(404, 409, 410, 500, 503),
        roles=("download",),
    ),
    *ADMIN_ROUTES,
    Route(
        "GET",
        "/v1/recordings/{id}/playback",
        "playbackUrl",
        "A short-lived signed URL to the stream, for <audio src>",
        "playback_url",
        params=(
            RECORDING_ID,
            Param(
                "ttl",
                "query",
                "integer",
                "Lifetime in seconds (at most [playback] url_ttl)",
                minimum=1,
            ),
        ),
        answers=(Answer(200, "The signed URL", schemas.PlaybackUrl),),
        errors=(400, 401, 404, 409, 410, 503),
        roles=("listen",),
    ),
)
