"""The admin routes: legal holds, erasure and the chain of custody, through the API.

Why the CLI's own functions: a hold placed or an erasure done through the
API must obey the same rules (holds block erasure, retention unless
overridden, S3 Object Lock), leave the same rows and receipts, and be
found by the same ``audit verify`` as one done on the command line. The
views here only scope the recording to the caller's tenant (404 for any
other, as everywhere), read the body, and map the domain's refusals to
statuses with stable codes. The role (``admin``) is checked before the view
runs (``Route.roles``), and each row the domain writes names the credential
(``audit_context`` in :func:`fsrecrypt.web.app._endpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from flask import Response, g, jsonify

from fsrecrypt.errors import ConfigError, InvalidState, NotFound
from fsrecrypt.lifecycle.custody import recording_custody
from fsrecrypt.lifecycle.erase import (
    ErasureIncomplete,
    RetentionActive,
    StorageRetentionLocked,
    erase_selected,
)
from fsrecrypt.lifecycle.holds import LegalHoldActive, add_hold, remove_hold
from fsrecrypt.web import schemas
from fsrecrypt.web.errors import ApiError

if TYPE_CHECKING:
    from fsrecrypt.pipeline import Services
    from fsrecrypt.web.access import Access
    from fsrecrypt.web.app import Params
    from fsrecrypt.web.auth import Principal

# Most specific first: each is an InvalidState.
_REFUSALS: tuple[tuple[type[Exception], int, str], ...] = (
    (LegalHoldActive, 409, "legal_hold_active"),
    (RetentionActive, 409, "retention_active"),
    (StorageRetentionLocked, 409, "storage_retention_locked"),
    (InvalidState, 409, "invalid_state"),
    (ConfigError, 400, "invalid_request"),
)


@contextmanager
def _domain_refusals() -> Iterator[None]:
    """The lifecycle's refusals as API errors with stable codes (their messages kept)."""
    try:
        yield
    except ErasureIncomplete as exc:
        raise ApiError(exc.message, status=503, code="erasure_incomplete", hint=exc.hint) from None
    except (InvalidState, ConfigError) as exc:
        for cls, status, code in _REFUSALS:
            if isinstance(exc, cls):
                raise ApiError(exc.message, status=status, code=code, hint=exc.hint) from None
        raise


def _hold_results(results: list[dict[str, Any]]) -> Response:
    return jsonify(schemas.to_json(schemas.HoldResults([schemas.HoldResult(**r) for r in results])))


class AdminViews:
    """Mixed into :class:`fsrecrypt.web.views.Views`: one method per admin route."""

    services: Services
    access: Access

    def _admin_recording(self, params: Params, action: str) -> tuple[Principal, Any]:
        g.action = action
        principal = self.access.principal()
        return principal, self.access.tenant_recording(principal, params.path("id"), action)

    def custody(self, params: Params) -> Response:
        principal, recording = self._admin_recording(params, "custody")
        with _domain_refusals():
            doc = recording_custody(self.services, recording.id, user_id=principal.user_id)
        g.audited = True
        return jsonify(doc)

    def _change_hold(self, params: Params, action: str, change: Callable[..., Any]) -> Response:
        principal, recording = self._admin_recording(params, action)
        body = params.body()
        try:
            with _domain_refusals():
                results = change(
                    self.services,
                    reason=body.reason,
                    user_id=principal.user_id,
                    recording_id=recording.id,
                )
        except NotFound as exc:  # release: no active hold (the recording itself was found)
            self.access.audit(action, False, recording=recording, error="no_active_hold")
            raise ApiError(exc.message, status=409, code="no_active_hold", hint=exc.hint) from None
        except ApiError as exc:
            self.access.audit(action, False, recording=recording, error=exc.code)
            raise
        g.audited = True
        return _hold_results(results)

    def hold_add(self, params: Params) -> Response:
        return self._change_hold(params, "hold_add", add_hold)

    def hold_release(self, params: Params) -> Response:
        return self._change_hold(params, "hold_remove", remove_hold)

    def erase(self, params: Params) -> Response:
        principal, recording = self._admin_recording(params, "erase")
        body = params.body()
        try:
            with _domain_refusals():
                receipt = erase_selected(
                    self.services,
                    reason=body.reason,
                    user_id=principal.user_id,
                    recording_id=recording.id,
                    override_retention=body.override_retention,
                )
        except ApiError as exc:
            # Refused before anything was destroyed (holds, retention, storage lock):
            # the CLI leaves no row then; the API's caller is remote, so it does.
            if exc.code != "erasure_incomplete":
                self.access.audit("erase", False, recording=recording, error=exc.code)
            raise
        g.audited = True
        return jsonify(receipt)
