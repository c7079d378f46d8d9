"""Signed playback URLs: ``<audio src>`` cannot send headers, so ``/playback`` signs a URL.

The signature is an HMAC over everything the URL grants (recording, tenant,
user, API key, expiry) under a key kept in a 0600 file beside the config.
Revoking the API key revokes its URLs: verification looks the key up.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import TYPE_CHECKING

from fsrecrypt.keyfile import KEY_BYTES, KeyFileSpec, load_key_file
from fsrecrypt.numbers import NumberError, parse_int
from fsrecrypt.web.auth import Principal, active_key
from fsrecrypt.web.errors import ApiAuthError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsrecrypt.pipeline import Services

SIGNING_KEY_BYTES = KEY_BYTES
EXPIRY_DIGITS = 12
"""A signed URL's exp has at most 12 digits (Unix seconds up to the year 33658)."""
_SIGNATURE_RE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")


URL_SIGNING_KEY = KeyFileSpec(
    what="URL signing key",
    setting="[playback] signing_key_file",
    power="mint playback URLs",
    created_by="fsrecrypt serve (issued URLs stop working)",
)


def load_signing_key(path: str) -> bytes:
    """The URL-signing key, created (0600, 256 random bits) on first use.

    The file is refused if group or others can read it, or if it is a
    symlink: whoever reads it can mint playback URLs for any recording.
    """
    return load_key_file(path, URL_SIGNING_KEY)


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
        self, services: Services, recording_id: str, args: Mapping[str, str], now: float
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
        found = active_key(services, kid)
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
