"""API keys: who may listen (``X-API-Key``), and the ``fsrecrypt apikeys`` operations.

A key names a user of one tenant. Only a hash of it is stored: the secret
carries 256 random bits, so a fast hash suffices and the key is shown once,
when it is created. The public key id is part of the key, so a key is found
by id and then compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from fsrecrypt.errors import AlreadyExists, ConfigError, NotFound
from fsrecrypt.web.errors import ApiAuthError

if TYPE_CHECKING:
    from fsrecrypt.pipeline import Services

API_KEY_HEADER = "X-API-Key"
API_KEY_PREFIX = "fsr_"
_API_KEY_RE = re.compile(r"^fsr_([0-9a-f]{16})_([A-Za-z0-9_-]{43})\Z")
_LAST_USED_GRANULARITY_S = 60
_CREATE_ATTEMPTS = 2
"""A 64-bit key id collision is vanishingly rare: one retry is plenty."""


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
    for attempt in range(1, _CREATE_ATTEMPTS + 1):
        key_id, key = new_api_key()
        try:
            with services.db.transaction("creating an API key") as cur:
                cur.execute(
                    "INSERT INTO api_keys (key_id, key_hash, tenant_id, user_id)"
                    " VALUES (%s, %s, %s, %s) RETURNING created_at",
                    (key_id, hash_api_key(key), tenant.id, user_id),
                )
                created_at = cur.fetchone()[0]
        except AlreadyExists:
            if attempt == _CREATE_ATTEMPTS:
                raise
            continue
        break
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


def active_key(services: Services, key_id: str) -> tuple[ApiKeyRow, str] | None:
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
    found = active_key(services, match[1])
    if found is None:
        raise refused
    row, stored_hash = found
    if not hmac.compare_digest(stored_hash, hash_api_key(key.strip())):
        raise refused
    return Principal(row.tenant_id, row.tenant_name, row.user_id, row.key_id, "api_key")
