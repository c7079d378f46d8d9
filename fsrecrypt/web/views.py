"""The views: one method per route of :data:`fsrecrypt.web.routes.ROUTES`.

A view gets the route's declared parameters (:class:`fsrecrypt.web.app.Params`),
checks access through :class:`.access.Access`, and answers with a body
built from :mod:`.schemas`, or, for ``/stream``, an audited audio stream.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

from flask import Response, g, jsonify, request

from fsrecrypt import pipeline
from fsrecrypt.db import bounded
from fsrecrypt.errors import FsrecryptError
from fsrecrypt.web import schemas, upload
from fsrecrypt.web.access import Access, client_ip, user_agent
from fsrecrypt.web.admin import AdminViews
from fsrecrypt.web.auth import Principal
from fsrecrypt.web.errors import classify
from fsrecrypt.web.ranges import BadRange, parse_range
from fsrecrypt.web.routes import DEFAULT_LIST_LIMIT
from fsrecrypt.web.stream import AuditedStream, full_plaintext

if TYPE_CHECKING:
    from fsrecrypt.pipeline import Services
    from fsrecrypt.web.app import Params

RANGE_LIMIT = 100
STATIC_DIR = "static"
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "media-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def _json(value: Any) -> Response:
    return jsonify(schemas.to_json(value))


def _static_file(name: str, mimetype: str) -> Response:
    data = resources.files("fsrecrypt.web").joinpath(STATIC_DIR, name).read_bytes()
    response = Response(data, mimetype=mimetype)
    response.headers["Content-Security-Policy"] = _PAGE_POLICY
    response.headers["Cache-Control"] = "no-cache"
    return response


class Views(AdminViews):
    """The route handlers over one set of services (key provider, store, database).

    The admin routes' handlers are mixed in from :mod:`.admin`.
    """

    def __init__(
        self, services: Services, access: Access, spec: dict[str, Any], now: Callable[[], float]
    ) -> None:
        self.services = services
        self.access = access
        self.spec = spec
        self.now = now

    # -- pages and documents ---------------------------------------------------------------

    def index(self, _params: Params) -> Response:
        return _static_file("index.html", "text/html")

    def app_js(self, _params: Params) -> Response:
        return _static_file("app.js", "text/javascript")

    def app_css(self, _params: Params) -> Response:
        return _static_file("app.css", "text/css")

    def openapi(self, _params: Params) -> Response:
        response = jsonify(self.spec)
        response.headers["Cache-Control"] = "no-cache"
        return response

    # -- API -------------------------------------------------------------------------------

    def me(self, _params: Params) -> Response:
        p = self.access.principal()
        return _json(
            schemas.Principal(
                p.tenant_name,
                p.tenant_id,
                p.user_id,
                list(p.roles),
                p.via,
                p.key_id,
                p.issuer,
                p.service_user,
            )
        )

    def list_recordings(self, params: Params) -> Response:
        g.action = "list"
        principal = self.access.principal()
        limit = params.integer("limit", default=DEFAULT_LIST_LIMIT)
        rows = self.services.db.recordings(
            tenant_id=principal.tenant_id,
            call_uuid=params.text("call_uuid") or None,
            created_from=params.time("from"),
            created_to=params.time("to"),
            limit=limit,
        )
        return _json(schemas.RecordingList([schemas.recording_of(r) for r in rows]))

    def get_recording(self, params: Params) -> Response:
        g.action = "metadata"
        principal = self.access.principal()
        recording = self.access.tenant_recording(principal, params.path("id"), "metadata")
        return _json(schemas.recording_of(recording))

    def playback_url(self, params: Params) -> Response:
        g.action = "playback_url"
        principal = self.access.principal()
        recording = self.access.tenant_recording(principal, params.path("id"), "playback_url")
        self.access.usable(recording, "playback_url")
        url_ttl = self.services.config.playback.url_ttl
        ttl = params.integer("ttl", default=url_ttl, maximum=url_ttl)
        expires = int(self.now()) + ttl
        query = self.access.signer.query(recording.id, principal, expires)
        url = f"/v1/recordings/{recording.id}/stream?" + "&".join(
            f"{k}={v}" for k, v in query.items()
        )
        url = https_url(url)
        expires_at = datetime.fromtimestamp(expires, UTC).isoformat()
        self.access.audit(
            "playback_url", True, recording=recording, details={"expires_at": expires_at}
        )
        return _json(schemas.PlaybackUrl(url, expires_at, ttl))

    def upload_recording(self, params: Params) -> Response:
        g.action = "upload"
        principal = self.access.principal()
        return upload.upload_recording(
            self.services, self.access, params, principal, time.monotonic
        )

    def stream(self, params: Params) -> Response:
        return self._audio(params, "stream", "inline", params.header("Range"))

    def download(self, params: Params) -> Response:
        return self._audio(params, "download", "attachment", None)

    def _audio(
        self, params: Params, action: str, disposition: str, range_header: str | None
    ) -> Response:
        """The recording's audio: ``stream`` (inline, Range) or ``download`` (attachment, whole)."""
        g.action = action
        started = time.monotonic()
        recording_id = params.path("id")
        principal = self.access.principal()
        recording = self.access.tenant_recording(principal, recording_id, action)
        self.access.usable(recording, action)
        size = recording.file_size_bytes or 0
        try:
            wanted = parse_range(range_header, size)
        except BadRange as exc:
            self.access.audit(
                action,
                False,
                recording=recording,
                error="range_not_satisfiable",
                details={"range_header": bounded_range(range_header)},
            )
            exc.headers = {"Content-Range": f"bytes */{size}"}  # type: ignore[attr-defined]
            raise
        headers = {
            "Content-Disposition": f'{disposition}; filename="{recording.id}.wav"',
            "Cache-Control": "private, no-store",
        }
        if action == "stream":
            headers["Accept-Ranges"] = "bytes"
        if request.method == "HEAD":
            response = Response(b"", mimetype="audio/wav", headers=headers)
            response.headers["Content-Length"] = str(size)
            return response
        start, end = (0, size) if wanted is None else wanted
        body = self._audited_body(principal, recording, wanted, (start, end), started, action)
        status = 200 if wanted is None else 206
        response = Response(
            body, status=status, mimetype="audio/wav", headers=headers, direct_passthrough=True
        )
        response.headers["Content-Length"] = str(end - start)
        if wanted is not None:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return response

    def _audited_body(
        self,
        principal: Principal,
        recording: Any,
        wanted: tuple[int, int] | None,
        span: tuple[int, int],
        started: float,
        action: str,
    ) -> AuditedStream:
        """The plaintext of ``[start, end)``, its first frame verified, audited when it ends."""
        start, end = span
        size = recording.file_size_bytes or 0
        range_details = {"range": {"start": start, "end": end - 1 if end else None, "size": size}}
        agent = user_agent()
        ip = client_ip()
        services = self.services
        opened_with: dict[str, Any] = {}
        try:
            if wanted is None:
                chunks = full_plaintext(services, recording, opened_with)
            else:
                opened, _plan, chunks = pipeline.open_range(services, recording, start, end)
                opened_with.update(pipeline.playback.opened_details(opened))
            # The first frame is authenticated before the status line goes out,
            # so a bad header or first frame is a clean JSON error, not a cut stream.
            first = next(chunks, b"")
        except FsrecryptError as exc:
            # The row names the failure's class as the caller sees it
            # (integrity_error, key_unavailable, ...), so tampering and a
            # swapped object are told apart from outages in the audit log.
            self.access.audit(
                action,
                False,
                recording=recording,
                error=f"{type(exc).__name__}: {exc.message}",
                details={**range_details, "error_code": classify(exc)[1]},
                duration_ms=(time.monotonic() - started) * 1000,
            )
            raise

        def on_close(sent: int, error: str | None, completed: bool) -> None:
            services.db.audit(
                action=action,
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
                    **principal.audit_details(),
                    **opened_with,
                },
            )

        return AuditedStream(first, chunks, expected=end - start, on_close=on_close)


_HOST_RE = re.compile(r"(?:[A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}(?::[0-9]{1,5})?", re.ASCII)


def https_url(path: str) -> str:
    """``path`` as an absolute https URL when the request came over https (TLS or a trusted
    proxy), so a signed URL never sends its signature in the clear; else as it is.
    A Host header that is not a plain host name (or IPv6 literal) keeps the path relative."""
    host = request.host
    if request.scheme != "https" or not (
        _HOST_RE.fullmatch(host) or re.fullmatch(r"\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?", host)
    ):
        return path
    return f"https://{host}{path}"


def bounded_range(header: str | None) -> str | None:
    """A Range header as it may go into the access log (bounded)."""
    return bounded(header or "", RANGE_LIMIT)
