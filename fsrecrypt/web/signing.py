"""Signed playback URLs: ``<audio src>`` cannot send headers, so ``/playback`` signs a URL.

The signature is an HMAC over everything the URL grants (recording, tenant,
user, API key, expiry) under a key kept in a 0600 file beside the config.
Revoking the API key revokes its URLs: verification looks the key up.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from fsrecrypt.errors import ConfigError
from fsrecrypt.numbers import NumberError, parse_int
from fsrecrypt.web.auth import Principal, active_key
from fsrecrypt.web.errors import ApiAuthError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsrecrypt.pipeline import Services

SIGNING_KEY_BYTES = 32
EXPIRY_DIGITS = 12
"""A signed URL's exp has at most 12 digits (Unix seconds up to the year 33658)."""
_SIGNATURE_RE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")


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
