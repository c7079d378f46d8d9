"""Bearer tokens (JWT) from the platform's identity provider: verified, mapped to a principal.

Why here and not in a proxy: the access log must name the person, and the
tenant and roles must come from a source the caller cannot edit. A token is
accepted only if it is signed by a key of the configured key set (JWKS) with
an algorithm of the allow-list (asymmetric only: ``none`` and HMAC are never
accepted, so a public key can never be used as an HMAC secret), names the
configured issuer and audience, is within its lifetime (plus ``leeway``), and
carries a subject and a tenant that exists. Verification is PyJWT's; this
module chooses the key and maps the claims.

The key set comes from ``[auth] jwks_url`` or ``jwks_file``. It is cached and
fetched again when a token names a key id the cache does not hold (keys
rotate), or when it is older than ``jwks_cache_ttl``; never more than once per
``jwks_min_refresh`` seconds, and each fetch is bounded in time
(``jwks_timeout`` for the whole response, enforced by a watchdog that shuts
the socket) and size (``jwks_max_bytes``). A failed fetch keeps the last good
keys; with none at all, token requests answer 503.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt

from fsrecrypt.config_auth import TOKEN_ALGORITHMS, AuthConfig
from fsrecrypt.errors import NotFound
from fsrecrypt.web.auth import ROLES, Principal, Role
from fsrecrypt.web.errors import ApiAuthError, ApiError

if TYPE_CHECKING:
    from fsrecrypt.pipeline import Services

log = logging.getLogger("fsrecrypt.web")

MAX_TOKEN_CHARS = 16384
MAX_SUBJECT_CHARS = 200
_READ_CHUNK = 16384
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# Which key types can verify which algorithms (a key of another type is refused).
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


class KeySetUnavailable(ApiError):
    """No usable key set: the identity provider's JWKS could not be fetched or read."""

    status = 503
    code = "identity_provider_unavailable"
    transient = True


def _refused(code: str, message: str) -> ApiAuthError:
    return ApiAuthError(
        message,
        code=code,
        hint="Sign in again to get a fresh token from the platform, or use an API key.",
    )


@dataclass(frozen=True)
class _Key:
    kid: str | None
    kty: str
    alg: str | None
    key: Any


def parse_jwks(data: bytes) -> dict[str | None, _Key]:
    """The usable public keys of a JWKS document by kid; ValueError if it is not one.

    Keys PyJWT cannot load, private or symmetric (``oct``) keys, and keys
    marked for encryption are skipped: only public signature keys count.
    """
    doc = json.loads(data.decode("utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str | None, _Key] = {}
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        if entry.get("use", "sig") != "sig" or "d" in entry:
            continue
        try:
            loaded = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        alg = entry.get("alg") if isinstance(entry.get("alg"), str) else None
        keys[kid] = _Key(kid, entry["kty"], alg, loaded.key)
    if not keys:
        raise ValueError("the JWKS holds no usable public signature key")
    return keys


def fetch_bounded(url: str, *, timeout: float, max_bytes: int) -> bytes:
    """GET ``url``: the whole response within ``timeout`` seconds and ``max_bytes``, or OSError.

    A watchdog shuts the socket down at the deadline, so a server that
    drips its headers or body one byte at a time cannot hold the request
    longer than ``timeout`` (a per-read socket timeout alone would not).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    deadline = time.monotonic() + timeout
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        if conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise OSError(f"response of {declared} bytes exceeds {max_bytes}")
        body = bytearray()
        while True:
            if time.monotonic() > deadline:
                raise OSError(f"response not complete within {timeout} s")
            chunk = response.read1(_READ_CHUNK)
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise OSError(f"response exceeds {max_bytes} bytes")
        if expired.is_set():
            raise OSError(f"response not complete within {timeout} s")
        return bytes(body)
    except (http.client.HTTPException, ValueError) as exc:
        if expired.is_set():  # the watchdog cut a response short mid-line
            raise OSError(f"response not complete within {timeout} s") from None
        raise OSError(f"bad HTTP response: {type(exc).__name__}") from None
    except OSError:
        if expired.is_set():
            raise OSError(f"response not complete within {timeout} s") from None
        raise
    finally:
        watchdog.cancel()
        conn.close()


def _read_file(path: str, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"{path} exceeds {max_bytes} bytes")
    return data


class KeySet:
    """The JWKS, cached; fetched again on an unknown kid or when stale, rate-bounded."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[], bytes] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self._loader = loader or self._load
        self._keys: dict[str | None, _Key] = {}
        self._loaded_at: float | None = None
        self._tried_at: float | None = None
        self._lock = threading.Lock()
        self.fetches = 0

    def _load(self) -> bytes:
        cfg = self.config
        if cfg.jwks_url:
            return fetch_bounded(
                cfg.jwks_url, timeout=cfg.jwks_timeout, max_bytes=cfg.jwks_max_bytes
            )
        return _read_file(cfg.jwks_file, cfg.jwks_max_bytes)

    def _refresh(self, why: str) -> None:
        """Fetch again unless a fetch was tried less than ``jwks_min_refresh`` s ago.

        With keys in hand, a request that finds another fetch under way does
        not wait for it (it uses the keys it has); without any, it waits.
        """
        if not self._lock.acquire(blocking=not self._keys):
            return
        try:
            now = self.clock()
            if self._tried_at is not None and now - self._tried_at < self.config.jwks_min_refresh:
                return
            self._tried_at = now
            self.fetches += 1
            source = self.config.jwks_url or self.config.jwks_file
            try:
                keys = parse_jwks(self._loader())
            except (OSError, ValueError, RecursionError) as exc:
                # Bounded text only: never the response body.
                log.warning("token keys: %s (%s) failed: %s", source, why, str(exc)[:200])
                return
            self._keys, self._loaded_at = keys, now
            log.info("token keys: loaded %d key(s) from %s (%s)", len(keys), source, why)
        finally:
            self._lock.release()

    def key(self, kid: str | None) -> _Key:
        """The key for ``kid``; refetches once (rate-bounded) if unknown or stale."""
        stale = self._loaded_at is None or (
            self.clock() - self._loaded_at > self.config.jwks_cache_ttl
        )
        if stale:
            self._refresh("stale" if self._loaded_at is not None else "first use")
        found = self._lookup(kid)
        if found is None and self._keys:
            self._refresh("unknown kid")
            found = self._lookup(kid)
        if found is not None:
            return found
        if not self._keys:
            raise KeySetUnavailable(
                "the identity provider's signing keys are unavailable",
                hint="Retry later; the operators must check [auth] jwks_url or jwks_file.",
            )
        raise _refused("unknown_key", "the token's signing key (kid) is not in the key set")

    def _lookup(self, kid: str | None) -> _Key | None:
        if kid is None:
            # Only a key set of one key may leave the kid out.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name, or a nested one by a dotted path (``realm_access.roles``)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def roles_of(value: Any) -> tuple[Role, ...]:
    """The known roles in a roles claim (a list, or a space-separated string); others ignored."""
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list):
        return ()
    held = {v for v in value if isinstance(v, str)}
    return tuple(r for r in ROLES if r in held)


_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet"),
    (jwt.InvalidAudienceError, "token_wrong_audience", "the token is for another audience"),
    (jwt.InvalidIssuerError, "token_wrong_issuer", "the token is from another issuer"),
    (jwt.InvalidSignatureError, "token_bad_signature", "the token's signature is not valid"),
    (jwt.MissingRequiredClaimError, "token_missing_claim", "the token lacks a required claim"),
)


class TokenVerifier:
    """``Authorization: Bearer`` values -> principals, per ``[auth]``."""

    def __init__(self, services: Services, keys: KeySet | None = None) -> None:
        self.services = services
        self.config = services.config.auth
        self.keys = keys or KeySet(self.config)
        # Only asymmetric algorithms, whatever the configuration says.
        self.algorithms = tuple(a for a in self.config.algorithms if a in TOKEN_ALGORITHMS)

    def principal(self, token: str) -> Principal:
        """The principal a token speaks for, or ApiAuthError with the reason's code."""
        claims = self.claims(token)
        subject = claims.get("sub")
        if (
            not isinstance(subject, str)
            or not 0 < len(subject.strip()) <= MAX_SUBJECT_CHARS
            or not subject.isprintable()
        ):
            raise _refused("token_missing_claim", "the token's sub is not a printable user id")
        tenant_value = _claim(claims, self.config.tenant_claim)
        if not isinstance(tenant_value, str) or not tenant_value:
            raise _refused(
                "token_missing_claim", f"the token has no {self.config.tenant_claim!r} claim"
            )
        tenant = self._tenant(tenant_value)
        return Principal(
            tenant.id,
            tenant.name,
            subject.strip(),
            None,
            "jwt",
            roles_of(_claim(claims, self.config.roles_claim)),
            issuer=str(claims["iss"]),
        )

    def _tenant(self, value: str) -> Any:
        try:
            return self.services.db.tenant_by_name(value)
        except NotFound:
            pass
        if _UUID_RE.match(value.lower()):
            with contextlib.suppress(NotFound):
                return self.services.db.tenant_by_id(value.lower())
        raise _refused("unknown_tenant", "the token names a tenant this server does not know")

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of a token (signature, algorithm, iss, aud, exp, nbf)."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise _refused("invalid_token", "the bearer token is empty or too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused("invalid_token", "the bearer token is not a JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise _refused(
                "token_algorithm_refused",
                f"the token's algorithm is not accepted (accepted: {', '.join(self.algorithms)})",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _refused("invalid_token", "the token's kid is not a string")
        key = self.keys.key(kid)
        if _KEY_TYPES.get(alg[:2]) != key.kty or (key.alg is not None and key.alg != alg):
            raise _refused("token_algorithm_refused", "the token's algorithm does not fit its key")
        try:
            return jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            for cls, code, message in _ERRORS:
                if isinstance(exc, cls):
                    raise _refused(code, message) from None
            raise _refused("invalid_token", "the bearer token is not valid") from None
