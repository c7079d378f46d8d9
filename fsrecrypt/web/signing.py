"""Signed playback URLs: ``<audio src>`` cannot send headers, so ``/playback`` signs a URL.

The signature is an HMAC over everything the URL grants (recording, tenant,
user, API key, expiry) under a key kept in a 0600 file beside the config.
Revoking the API key revokes its URLs: verification looks the key up.

A URL issued to a bearer token's principal, or to a service key acting for
an end user, carries that principal in ``who`` (base64url JSON: user,
issuer, tenant), which the signature covers too, so the stream is logged
under the same user and issuer as the request that asked for the URL. A
token's URL grants ``listen`` only and lives at most ``[playback] url_ttl``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from typing import TYPE_CHECKING

from fsrecrypt.keyfile import KEY_BYTES, KeyFileSpec, load_key_file
from fsrecrypt.numbers import NumberError, parse_int
from fsrecrypt.web.auth import Principal, active_key, key_principal
from fsrecrypt.web.errors import ApiAuthError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsrecrypt.pipeline import Services

SIGNING_KEY_BYTES = KEY_BYTES
EXPIRY_DIGITS = 12
"""A signed URL's exp has at most 12 digits (Unix seconds up to the year 33658)."""
_SIGNATURE_RE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")
_WHO_RE = re.compile(r"^[A-Za-z0-9_-]{1,4096}\Z")
TOKEN_KID = "jwt"  # noqa: S105 (a marker, not a secret)
"""The ``kid`` of a URL issued to a bearer token's principal (no API key behind it)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def who_of(principal: Principal) -> str | None:
    """The ``who`` parameter for a principal that is not plainly its key's own user."""
    if principal.via != "jwt" and principal.service_user is None:
        return None
    body = {"u": principal.user_id, "t": principal.tenant_id, "n": principal.tenant_name}
    if principal.issuer is not None:
        body["i"] = principal.issuer
    return _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8"))


def _read_who(who: str) -> dict[str, str] | None:
    """The fields of a ``who`` value whose signature already verified (None if malformed)."""
    try:
        body = json.loads(base64.urlsafe_b64decode(who + "=" * (-len(who) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(body, dict) or not all(
        isinstance(body.get(k), str) and body[k] for k in ("u", "t", "n")
    ):
        return None
    if "i" in body and not isinstance(body["i"], str):
        return None
    return body


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

    def signature(
        self, recording_id: str, principal: Principal, expires: int, who: str | None = None
    ) -> str:
        parts = [
            "fsrecrypt-playback-v1" if who is None else "fsrecrypt-playback-v2",
            recording_id.lower(),
            principal.tenant_id,
            principal.user_id,
            principal.key_id or TOKEN_KID,
            str(expires),
        ]
        if who is not None:
            parts.append(who)
        digest = hmac.new(self._key, "\n".join(parts).encode("utf-8"), hashlib.sha256).digest()
        return _b64(digest)

    def query(self, recording_id: str, principal: Principal, expires: int) -> dict[str, str]:
        who = who_of(principal)
        query = {
            "kid": principal.key_id or TOKEN_KID,
            "exp": str(expires),
            "sig": self.signature(recording_id, principal, expires, who),
        }
        if who is not None:
            query["who"] = who
        return query

    def verify(
        self, services: Services, recording_id: str, args: Mapping[str, str], now: float
    ) -> Principal:
        """The principal a signed URL speaks for, or ApiAuthError (expired, altered, revoked)."""
        kid, exp, sig = args.get("kid", ""), args.get("exp", ""), args.get("sig", "")
        who = args.get("who") or None
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
        if not _SIGNATURE_RE.fullmatch(sig) or (who is not None and not _WHO_RE.fullmatch(who)):
            raise altered
        fields = _read_who(who) if who is not None else None
        if who is not None and fields is None:
            raise altered
        if kid == TOKEN_KID and fields is not None:
            principal = Principal(
                fields["t"],
                fields["n"],
                fields["u"],
                None,
                "signed_url",
                ("listen",),
                issuer=fields.get("i"),
            )
        elif re.fullmatch(r"[0-9a-f]{16}", kid):
            found = active_key(services, kid)
            if found is None:
                raise altered
            principal = key_principal(found[0], "signed_url")
            if fields is not None:
                if not principal.may_act_for_users or fields["t"] != principal.tenant_id:
                    raise altered
                principal = principal.acting_for(fields["u"])
        else:
            raise altered
        if not hmac.compare_digest(self.signature(recording_id, principal, expires, who), sig):
            raise altered
        if expires <= now:
            raise ApiAuthError(
                "the playback URL has expired",
                code="url_expired",
                status=403,
                hint="Ask GET /v1/recordings/{id}/playback for a new URL.",
            )
        return principal
