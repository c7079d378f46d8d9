"""Hierarchy tenants' branch keys: a new version, or a move to another KMS key.

``fsrecrypt keys rotate-branch`` and ``fsrecrypt rotate`` for such tenants.
With ``[keys] provider = "aws-kms-hierarchy"`` a tenant's key is a branch key
in the DynamoDB key store, and every recording's data key is wrapped by a key
derived from it. So both operations touch the key store only, never a
recording: versioning makes a new active version (older ones keep
decrypting), and moving re-wraps the branch key's few items under another
KMS key (one ReEncrypt and one conditional write each). Recordings,
their rows and their object headers stay as they are: the EDKs name the branch
key, which is the same key afterwards.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fsrecrypt.config import Config
from fsrecrypt.db import Tenant
from fsrecrypt.errors import ConfigError, FsrecryptError
from fsrecrypt.keys import DIRECT_KMS_PREFIXES
from fsrecrypt.pipeline import Services

HIERARCHY = "aws-kms-hierarchy"


def uses_branch_keys(config: Config) -> bool:
    """True when tenants' keys are branch keys (``[keys] provider = "aws-kms-hierarchy"``)."""
    return config.keys.provider == HIERARCHY


def on_branch_key(config: Config, tenant: Tenant) -> bool:
    """The tenant's key is a branch key (not a KMS key it used before the switch)."""
    return uses_branch_keys(config) and not tenant.kms_key_id.startswith(DIRECT_KMS_PREFIXES)


def _provider(services: Services) -> Any:
    if not uses_branch_keys(services.config):
        raise ConfigError(
            "branch keys need [keys] provider = 'aws-kms-hierarchy'",
            hint="Configure the branch key store ([keys] key_store_table, key_store_kms_key).",
        )
    return services.keys


@dataclass
class BranchKeyMoveSummary:
    """What ``rotate`` did for a hierarchy tenant (same shape the command prints for others)."""

    tenant: str
    to_key: str
    previous_tenant_key: str
    rewrite_headers: bool
    branch_key: str
    tenants_on_branch_key: list[str] = field(default_factory=list)
    items_rewrapped: list[str] = field(default_factory=list)
    items_already_current: list[str] = field(default_factory=list)
    kms_calls: int = 0
    stored: int = 0
    rewrapped: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    remaining: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _KmsCallCounter:
    """Counts the KMS requests made through one boto3 client (its event hooks)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls = 0

    def __call__(self, **_kwargs: Any) -> None:
        self.calls += 1

    def __enter__(self) -> _KmsCallCounter:
        self.client.meta.events.register("before-call.kms.*", self, unique_id=id(self))
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.meta.events.unregister("before-call.kms.*", unique_id=id(self))


def _stored_count(services: Services, tenant_id: str) -> int:
    with services.db.transaction("counting a tenant's recordings") as cur:
        cur.execute(
            "SELECT count(*) FROM call_recordings WHERE tenant_id = %s AND status = 'stored'",
            (tenant_id,),
        )
        return int(cur.fetchone()[0])


def move_tenant_branch_key(
    services: Services,
    tenant: Tenant,
    to_key: str,
    *,
    rewrite_headers: bool,
    user_id: str,
) -> BranchKeyMoveSummary:
    """Move the tenant's branch key (all its versions) to KMS key ``to_key``.

    The items are re-wrapped first, then the new KMS key is recorded
    (``branch_keys``), then a throw-away data key is wrapped through a key
    store that trusts only the new key: the proof that the move worked.
    Running it again resumes a move a crash interrupted (items already on
    the new key are skipped). Other tenants sharing the branch key move
    with it; the summary names them. ``rewrite_headers`` changes nothing:
    headers hold the branch key's EDKs, and the branch key is the same.
    """
    started = time.monotonic()
    provider = _provider(services)
    branch = tenant.kms_key_id
    summary = BranchKeyMoveSummary(tenant.name, to_key, "", rewrite_headers, branch)
    try:
        with _KmsCallCounter(provider.kms_client) as counter:
            summary.previous_tenant_key = provider.kms_arn_for(branch, refresh=True)
            target = provider.resolve_kms_key(to_key)
            summary.to_key = target
            moved = provider.move_branch_key(branch, summary.previous_tenant_key, target)
            services.db.set_branch_key_kms(branch, target)
            provider.check_key(branch)
        summary.kms_calls = counter.calls
        summary.items_rewrapped = moved.rewrapped
        summary.items_already_current = moved.already_current
        summary.tenants_on_branch_key = services.db.tenants_on_branch_key(branch)
        summary.stored = _stored_count(services, tenant.id)
    except FsrecryptError as exc:
        summary.seconds = round(time.monotonic() - started, 3)
        services.db.audit(
            action="rotate",
            user_id=user_id,
            success=False,
            tenant_id=tenant.id,
            error_message=f"{type(exc).__name__}: {exc.message}",
            details=summary.as_dict(),
        )
        raise
    summary.seconds = round(time.monotonic() - started, 3)
    services.db.audit(
        action="rotate",
        user_id=user_id,
        success=True,
        tenant_id=tenant.id,
        details={**summary.as_dict(), "step": "branch-key-move"},
    )
    return summary


def rotate_branch(services: Services, tenant_name: str, *, user_id: str) -> dict[str, Any]:
    """A new active version of the tenant's branch key (``keys rotate-branch``).

    New recordings are wrapped by the new version as soon as each process's
    cached copy of the active version expires (``[keys] cache_ttl``); older
    versions stay in the key store and keep decrypting what they wrapped.
    """
    provider = _provider(services)
    tenant = services.db.tenant_by_name(tenant_name)
    result = {"tenant": tenant.name, "branch_key": tenant.kms_key_id}
    try:
        provider.version_branch_key(tenant.kms_key_id)
    except FsrecryptError as exc:
        services.db.audit(
            action="rotate-branch",
            user_id=user_id,
            success=False,
            tenant_id=tenant.id,
            error_message=f"{type(exc).__name__}: {exc.message}",
            details=result,
        )
        raise
    result["kms_key"] = provider.kms_arn_for(tenant.kms_key_id)
    result["tenants_on_branch_key"] = services.db.tenants_on_branch_key(tenant.kms_key_id)
    services.db.audit(
        action="rotate-branch", user_id=user_id, success=True, tenant_id=tenant.id, details=result
    )
    return result
