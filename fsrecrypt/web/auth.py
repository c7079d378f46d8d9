"""API keys and principals: who is asking, with which roles, and ``fsrecrypt apikeys``.

A key names a user of one tenant and holds roles (:data:`ROLES`): what its
holder may do, checked per route (``Route.roles``, enforced centrally in
``fsrecrypt.web.access.Access.authorize``). Only a hash of the key is stored:
the secret carries 256 random bits, so a fast hash suffices and the key is
shown once, when it is created. The public key id is part of the key, so a
key is found by id and then compared in constant time. A key created with
``on_behalf_of`` is a service's key: it may name the end user it acts for
(``X-On-Behalf-Of``), and the access log then records both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

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


Role = Literal["listen", "download", "ingest", "admin"]
ROLES: tuple[Role, ...] = ("listen", "download", "ingest", "admin")
"""listen: stream (Range) and playback URLs; download: the whole file as an
attachment; ingest: upload recordings; admin: holds, erasure and custody.
No role implies another: a key or token holds exactly the roles it names."""
DEFAULT_ROLES: tuple[Role, ...] = ("listen",)
_ROLE_ORDER = {role: i for i, role in enumerate(ROLES)}


def normalize_roles(roles: Iterable[str]) -> tuple[Role, ...]:
    """Known roles, deduplicated, in :data:`ROLES` order; ConfigError naming an unknown one."""
    found: set[str] = set()
    for role in roles:
        if role not in _ROLE_ORDER:
            raise ConfigError(
                f"unknown role {role[:40]!r}",
                hint="Roles are " + ", ".join(ROLES) + ".",
            )
        found.add(role)
    return tuple(sorted(found, key=_ROLE_ORDER.__getitem__))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user of one tenant, with roles, by API key, bearer token or signed URL.

    ``via`` is ``api_key``, ``jwt`` or ``signed_url``. ``key_id`` names the API
    key (None for a token). ``issuer`` is the token's ``iss`` (None for a key).
    ``service_user`` is set when a service key acts for ``user_id``
    (``X-On-Behalf-Of``): it is the key's own user. ``may_act_for_users``: the
    key was created with that right (``apikeys create --on-behalf-of``).
    """

    tenant_id: str
    tenant_name: str
    user_id: str
    key_id: str | None
    via: str
    roles: tuple[Role, ...] = DEFAULT_ROLES
    issuer: str | None = None
    service_user: str | None = None
    may_act_for_users: bool = False

    def acting_for(self, end_user: str) -> Principal:
        """This service key's principal acting for ``end_user`` (the caller checked the right)."""
        return dataclasses.replace(
            self, user_id=end_user, service_user=self.user_id, may_act_for_users=False
        )

    def has_any(self, roles: Iterable[str]) -> bool:
        """True if the principal holds at least one of ``roles`` (an empty set: anyone)."""
        wanted = tuple(roles)
        return not wanted or any(r in self.roles for r in wanted)

    def audit_details(self) -> dict[str, Any]:
        """What every access-log row of this principal says about how it authenticated."""
        out: dict[str, Any] = {"via": self.via}
        if self.key_id is not None:
            out["key_id"] = self.key_id
        if self.issuer is not None:
            out["issuer"] = self.issuer
            out["subject"] = self.user_id
        if self.service_user is not None:
            out["service_user"] = self.service_user
            out["on_behalf_of"] = self.user_id
        return out


@dataclass(frozen=True)
class ApiKeyRow:
    key_id: str
    tenant_id: str
    tenant_name: str
    user_id: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    roles: tuple[Role, ...] = DEFAULT_ROLES
    on_behalf_of: bool = False


def hash_api_key(key: str) -> str:
    """sha256 of the whole key: the secret carries 256 random bits, so no slow KDF is needed."""
    return hashlib.sha256(b"fsrecrypt-apikey-v1:" + key.encode("ascii")).hexdigest()


def new_api_key() -> tuple[str, str]:
    """A fresh (key_id, key): the id is public, the key is shown once and never stored."""
    key_id = secrets.token_hex(8)
    return key_id, f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def create_api_key(
    services: Services,
    tenant_name: str,
    user_id: str,
    *,
    roles: Iterable[str] = DEFAULT_ROLES,
    on_behalf_of: bool = False,
) -> tuple[ApiKeyRow, str]:
    """Store the hash of a new key for ``user_id`` of the tenant; return the row and the key.

    ``roles`` (default ``listen``) say what the key may do; ``on_behalf_of``
    lets it name the end user it acts for (a service's key).
    """
    user_id = user_id.strip()
    if not user_id or len(user_id) > 200:
        raise ConfigError(
            "the user id must be 1-200 characters",
            hint="Pass the supervisor's user id, e.g. --user alice@example.com.",
        )
    granted = normalize_roles(roles)
    if not granted:
        raise ConfigError("a key needs at least one role", hint="Pass --role listen, for example.")
    tenant = services.db.tenant_by_name(tenant_name)
    for attempt in range(1, _CREATE_ATTEMPTS + 1):
        key_id, key = new_api_key()
        try:
            with services.db.transaction("creating an API key") as cur:
                cur.execute(
                    "INSERT INTO api_keys (key_id, key_hash, tenant_id, user_id, roles,"
                    " on_behalf_of) VALUES (%s, %s, %s, %s, %s, %s) RETURNING created_at",
                    (key_id, hash_api_key(key), tenant.id, user_id, list(granted), on_behalf_of),
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
        details={"key_id": key_id, "roles": list(granted), "on_behalf_of": on_behalf_of},
    )
    row = ApiKeyRow(
        key_id, tenant.id, tenant.name, user_id, created_at, None, None, granted, on_behalf_of
    )
    return row, key


_KEY_COLUMNS = (
    "k.key_id, k.tenant_id, t.name, k.user_id, k.created_at, k.last_used_at,"
    " k.revoked_at, k.roles, k.on_behalf_of"
)


def _key_row(r: Any) -> ApiKeyRow:
    return ApiKeyRow(r[0], str(r[1]), *r[2:7], normalize_roles(r[7]), bool(r[8]))


def list_api_keys(services: Services, tenant_name: str | None = None) -> list[ApiKeyRow]:
    with services.db.transaction("listing API keys") as cur:
        cur.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"  # noqa: S608
            " WHERE %s IS NULL OR t.name = %s ORDER BY t.name, k.user_id, k.created_at",
            (tenant_name, tenant_name),
        )
        return [_key_row(r) for r in cur.fetchall()]


def revoke_api_key(services: Services, key_id: str) -> ApiKeyRow:
    """Revoke a key by its public id; its signed URLs stop working at once too."""
    if key_id.startswith(API_KEY_PREFIX):
        match = _API_KEY_RE.match(key_id)
        key_id = match[1] if match else key_id
    with services.db.transaction("revoking an API key") as cur:
        cur.execute(
            "UPDATE api_keys k SET revoked_at = coalesce(k.revoked_at, now())"  # noqa: S608
            " FROM tenants t WHERE t.id = k.tenant_id AND k.key_id = %s"
            f" RETURNING {_KEY_COLUMNS}",
            (key_id,),
        )
        row = cur.fetchone()
    if row is None:
        raise NotFound(
            f"no API key with id {key_id!r}",
            hint="List the key ids with 'fsrecrypt apikeys list'.",
        )
    revoked = _key_row(row)
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
            f"SELECT {_KEY_COLUMNS}, k.key_hash FROM api_keys k"  # noqa: S608
            " JOIN tenants t ON t.id = k.tenant_id WHERE k.key_id = %s AND k.revoked_at IS NULL",
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
    return _key_row(row), row[9]


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
    return key_principal(row, "api_key")


def key_principal(row: ApiKeyRow, via: str) -> Principal:
    """The principal an active key row speaks for (``via``: ``api_key`` or ``signed_url``)."""
    return Principal(
        row.tenant_id,
        row.tenant_name,
        row.user_id,
        row.key_id,
        via,
        row.roles,
        may_act_for_users=row.on_behalf_of,
    )
