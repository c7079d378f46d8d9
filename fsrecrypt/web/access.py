"""Who is asking, what they may see, and the access-log row every request leaves.

A recording of another tenant does not exist for the caller (404, never
403, so ids cannot be probed), and every access, refused and failed ones
included, writes a row to the tenant's hash-chained access log.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from flask import g, request

from fsrecrypt.db import USER_AGENT_LIMIT, bounded
from fsrecrypt.errors import FsrecryptError, InvalidState, NotFound, RecordingGone
from fsrecrypt.web.auth import API_KEY_HEADER, Principal, authenticate_api_key
from fsrecrypt.web.errors import ApiAuthError
from fsrecrypt.web.routes import ON_BEHALF_OF_HEADER, Route
from fsrecrypt.web.signing import UrlSigner

if TYPE_CHECKING:
    from fsrecrypt.pipeline import Services
    from fsrecrypt.web.app import Params
    from fsrecrypt.web.tokens import TokenVerifier

log = logging.getLogger("fsrecrypt.web")

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
PATH_LIMIT = 256
REQUESTED_ID_LIMIT = 64
END_USER_LIMIT = 200
BEARER_PREFIX = "bearer "
_END_USER_RE = re.compile(r"[^\x00-\x1f\x7f]{1,200}")


def client_ip() -> str | None:
    return request.remote_addr or None


def user_agent() -> str | None:
    return bounded(request.user_agent.string or None, USER_AGENT_LIMIT)


def request_path() -> str:
    return bounded(request.path, PATH_LIMIT) or ""


def requested_id(recording_id: str) -> str | None:
    """A caller-given id as it may go into the access log (bounded)."""
    return bounded(recording_id, REQUESTED_ID_LIMIT)


class Access:
    """The checks and the access-log rows of the current request (state lives in ``flask.g``)."""

    def __init__(
        self,
        services: Services,
        signer: UrlSigner,
        now: Callable[[], float],
        tokens: TokenVerifier | None = None,
    ) -> None:
        self.services = services
        self.signer = signer
        self.now = now
        self.tokens = tokens

    def audit(
        self,
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
            self.services.db.audit_refusal(
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
        self.services.db.audit(
            action=action,
            user_id=who.user_id if who else "anonymous",
            success=success,
            recording_id=recording.id if recording is not None else None,
            tenant_id=tenant_id,
            ip_address=client_ip(),
            user_agent=user_agent(),
            decryption_duration_ms=duration_ms,
            error_message=error,
            details={**(details or {}), **(who.audit_details() if who else {})},
        )

    def audit_unaudited_refusal(self, status: int, code: str) -> None:
        """Every refusal leaves evidence: a row for errors no handler audited itself."""
        if g.get("audited") or status < 400:
            return
        try:
            self.audit(
                g.get("action", "request"),
                False,
                error=code,
                details={"path": request_path(), "status": status},
            )
        except FsrecryptError as exc:
            log.error("could not write the refusal's access-log row: %s", exc.one_line())

    def principal(self) -> Principal:
        """The caller of this request, as ``authorize`` found it before the view ran."""
        found = g.get("principal")
        if found is None:  # a view of a public route asked: a bug in the route table
            raise LookupError("this route is public: there is no principal")
        return found

    def authorize(self, route: Route, params: Params) -> Principal:
        """Authenticate the caller the way ``route.security`` allows and check ``route.roles``.

        Run by the app before every non-public view. 401 when credentials are
        missing or refused, 403 ``forbidden_role`` when the caller lacks every
        role the route names, 403 ``on_behalf_refused`` when a key without the
        right names an end user; each refusal writes an access-log row.
        """
        bearer = request.headers.get("Authorization", "")
        key = request.headers.get(API_KEY_HEADER)
        if route.security == "api_key_or_signed_url" and params.has("sig") and not (key or bearer):
            signed = {name: params.text(name) or "" for name in ("kid", "exp", "sig", "who")}
            principal = self.signed_url(params.path("id"), signed)
        elif bearer:
            principal = self._bearer(bearer)
        else:
            principal = self._api_key(key)
        end_user = params.header(ON_BEHALF_OF_HEADER)
        if end_user is not None:
            principal = self._acting_for(principal, end_user)
        g.principal = principal
        if not principal.has_any(route.roles):
            self.audit(
                "auth",
                False,
                error="forbidden_role",
                details={
                    "path": request_path(),
                    "operation": route.operation_id,
                    "required_any_of": list(route.roles),
                    "roles": list(principal.roles),
                },
            )
            raise ApiAuthError(
                f"this request needs the role {' or '.join(route.roles)}; "
                f"the caller holds {', '.join(principal.roles) or 'no role'}",
                code="forbidden_role",
                status=403,
                hint="Ask the administrators for a key or token with that role.",
            )
        return principal

    def _refuse(
        self, code: str, message: str, hint: str, status: int = 401, reason: str | None = None
    ) -> ApiAuthError:
        """The refusal to raise, audited first (``reason``: the row's text if not the code)."""
        self.audit("auth", False, error=reason or code, details={"path": request_path()})
        return ApiAuthError(message, code=code, status=status, hint=hint)

    def _api_key(self, key: str | None) -> Principal:
        """The caller behind ``X-API-Key``, or 401 (audited)."""
        if not key:
            raise self._refuse(
                "auth_required",
                "an API key or a bearer token is required",
                f"Send the key in the {API_KEY_HEADER} header, or a token as "
                "'Authorization: Bearer <token>'.",
                reason="missing API key",  # the refusal buckets' reason since before tokens
            )
        try:
            return authenticate_api_key(self.services, key)
        except ApiAuthError as exc:
            self.audit("auth", False, error=exc.code, details={"path": request_path()})
            raise

    def _bearer(self, header: str) -> Principal:
        """The caller behind ``Authorization: Bearer <JWT>``, or 401 (audited, with the reason)."""
        if header[: len(BEARER_PREFIX)].lower() != BEARER_PREFIX:
            raise self._refuse(
                "unsupported_authorization",
                "only 'Authorization: Bearer <token>' is accepted",
                f"Send a token as 'Authorization: Bearer <token>', or a key in {API_KEY_HEADER}.",
            )
        if self.tokens is None:
            raise self._refuse(
                "bearer_not_configured",
                "this server accepts no bearer tokens",
                "Use an API key, or configure [auth] jwks_url or jwks_file.",
            )
        try:
            return self.tokens.principal(header[len(BEARER_PREFIX) :].strip())
        except ApiAuthError as exc:
            self.audit(
                "auth", False, error=exc.code, details={"path": request_path(), "via": "jwt"}
            )
            raise

    def _acting_for(self, principal: Principal, end_user: str) -> Principal:
        """The service key's principal acting for ``end_user``; 403 unless the key has the right."""
        g.principal = principal
        if not principal.may_act_for_users:
            raise self._refuse(
                "on_behalf_refused",
                f"this credential may not act for another user ({ON_BEHALF_OF_HEADER})",
                "Only keys created with 'fsrecrypt apikeys create --on-behalf-of' may name "
                "the end user they act for.",
                status=403,
            )
        if not _END_USER_RE.fullmatch(end_user.strip()):
            raise self._refuse(
                "invalid_on_behalf_of",
                f"{ON_BEHALF_OF_HEADER} must be a user id of 1-{END_USER_LIMIT} printable "
                "characters",
                "Send the end user's id, e.g. alice@example.com.",
                status=400,
            )
        return principal.acting_for(end_user.strip())

    def signed_url(self, recording_id: str, signed: Mapping[str, str]) -> Principal:
        """The caller a signed stream URL speaks for, or 400/403 (audited)."""
        try:
            principal = self.signer.verify(self.services, recording_id.lower(), signed, self.now())
        except ApiAuthError as exc:
            self.audit(
                "stream",
                False,
                error=exc.code,
                details={"requested_id": requested_id(recording_id), "path": request_path()},
            )
            raise
        g.principal = principal
        return principal

    def tenant_recording(self, principal: Principal, recording_id: str, action: str) -> Any:
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
                found = self.services.db.recording(recording_id.lower())
        if found is not None and found.tenant_id == principal.tenant_id:
            g.recording = found
            return found
        requested = requested_id(recording_id)
        common = {
            "action": action,
            "user_id": principal.user_id,
            "success": False,
            "ip_address": client_ip(),
            "user_agent": user_agent(),
            "error_message": "not_found",
        }
        via = principal.audit_details()
        rows: list[dict[str, Any]] = [
            {
                **common,
                "tenant_id": principal.tenant_id,
                "details": {"requested_id": requested, **via},
            }
        ]
        if found is not None:
            rows.append(
                {
                    **common,
                    "tenant_id": found.tenant_id,
                    "recording_id": found.id,
                    "error_message": "cross_tenant_refused",
                    "details": {"caller_tenant_id": principal.tenant_id, **via, "answered": 404},
                }
            )
        g.audited = True
        self.services.db.audit_together(rows)
        raise NotFound(
            f"no recording {requested} for this tenant",
            hint="List the tenant's recordings with GET /v1/recordings.",
        )

    def usable(self, recording: Any, action: str) -> None:
        """Only stored recordings play: 410 for erased ones, 409 for the rest (audited)."""
        if recording.status == "erased":
            self.audit(action, False, recording=recording, error="recording_erased")
            raise RecordingGone(f"recording {recording.id} was erased")
        if recording.status != "stored":
            self.audit(action, False, recording=recording, error=f"status {recording.status}")
            raise InvalidState(
                f"recording {recording.id} is {recording.status}, not stored",
                hint="Only stored recordings can be played; retry once it is stored.",
            )
