"""Escrow: change a tenant's keys (``tenants set-keys``) and prove its escrow keys open everything.

An escrow key is only worth something if it works on the day the primary
key does not. So it is added through the same resumable path as a key
rotation (every stored recording gets its escrow copy, each row in its own
transaction with its audit row), and ``verify --escrow`` opens every stored
recording's header with each escrow key alone, long before that day.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fsrecrypt import format as esdk
from fsrecrypt.db import Recording, Tenant
from fsrecrypt.errors import (
    ConfigError,
    FsrecryptError,
    InvalidState,
    KeyAccessError,
    ObjectMismatch,
)
from fsrecrypt.keys.escrow import RAW_AES_PREFIX
from fsrecrypt.lifecycle.common import PAGE, ProgressCallback, crash_point
from fsrecrypt.lifecycle.rotate import RotationSummary, rotate_tenant
from fsrecrypt.pipeline import (
    Services,
    edk_from_bytes,
    edk_to_bytes,
    encryption_context,
    read_object_header,
)
from fsrecrypt.pipeline.escrow import canonical_escrow_keys

_CAS_ATTEMPTS = 3
_PROBE_CONTEXT = {"fsrecrypt-purpose": "rotation-probe"}


@dataclass
class SetKeysSummary:
    tenant: str
    key: str
    escrow_keys: list[str]
    previous_escrow_keys: list[str]
    rotation: dict[str, Any] = field(default_factory=dict)
    escrow_rewrapped: int = 0
    # Recordings whose escrow copy by the new primary became the primary copy.
    promoted: int = 0
    gone: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    remaining: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_tenant_keys(
    services: Services,
    tenant_name: str,
    key: str,
    escrow_keys: Sequence[str],
    *,
    user_id: str,
    progress: ProgressCallback | None = None,
) -> SetKeysSummary:
    """Make ``key`` the tenant's primary and ``escrow_keys`` (exactly) its escrow keys.

    Every key is checked first (each must wrap now). The escrow list is
    switched at once, so recordings stored from now on (also by a running
    daemon) carry one EDK per key; then the primary moves through
    ``rotate`` and every stored recording gains the escrow copies it lacks
    and loses those of keys no longer named. Resumable: run it again after
    a failure or a kill and it finishes what is left.
    """
    started = time.monotonic()
    tenant = services.db.tenant_by_name(tenant_name)
    services.keys.check_key(key)
    refs = canonical_escrow_keys(services, key, escrow_keys)
    summary = SetKeysSummary(tenant.name, key, refs, list(tenant.escrow_key_ids))
    if (tenant.kms_key_id, list(tenant.escrow_key_ids)) != (key, refs):
        services.db.set_tenant_keys(tenant.id, key, refs)
    target = services.keys.generate_data_key(key, _PROBE_CONTEXT).key_id
    _promote_escrow_copies(services, tenant, target, refs, user_id, summary)
    rotation: RotationSummary = rotate_tenant(
        services, tenant_name, key, user_id=user_id, progress=progress
    )
    summary.rotation = {k: v for k, v in rotation.as_dict().items() if k != "failures"}
    summary.failures.update(rotation.failures)
    after: str | None = None
    while True:
        ids = services.db.recordings_escrow_differs(tenant.id, refs, after=after, limit=PAGE)
        if not ids:
            break
        for rec_id in ids:
            after = rec_id
            try:
                outcome = _rewrap_escrow(services, rec_id, refs, user_id)
            except FsrecryptError as exc:
                summary.failures[rec_id] = f"{type(exc).__name__}: {exc.message}"
            else:
                setattr(summary, outcome, getattr(summary, outcome) + 1)
    summary.remaining = len(
        services.db.recordings_escrow_differs(tenant.id, refs, after=None, limit=PAGE)
    ) + int(rotation.remaining)
    summary.seconds = round(time.monotonic() - started, 3)
    failed = bool(summary.failures) or summary.remaining > 0
    services.db.audit(
        action="set_keys",
        user_id=user_id,
        success=not failed,
        tenant_id=tenant.id,
        error_message=f"{len(summary.failures)} recording(s) failed" if failed else None,
        details={**summary.as_dict(), "failures": dict(list(summary.failures.items())[:50])},
    )
    return summary


def _as_escrow_ref(services: Services, key_id: str | None) -> str | None:
    """The escrow reference that names the same key as primary ``key_id``, if any.

    A KMS key is its ARN either way; a keyring key is ``raw-aes:<id>`` when
    the escrow keyring is the keyring itself.
    """
    if not key_id:
        return None
    if key_id.startswith("arn:"):
        return key_id
    keys = services.config.keys
    if keys.provider == "local" and services.escrow.keyring_path == keys.keyring:
        return f"{RAW_AES_PREFIX}{key_id}"
    return None


def _promote_escrow_copies(
    services: Services,
    tenant: Tenant,
    target: str,
    refs: Sequence[str],
    user_id: str,
    summary: SetKeysSummary,
) -> None:
    """Where the new primary already wraps a recording as an escrow key, swap the copies.

    Disaster recovery: the primary key is lost and an escrow key takes its
    place. The escrow copy *is* a copy by the new primary, so it becomes the
    primary copy without calling any key (the lost one cannot be called).
    Rows without such a copy are left to ``rotate``.
    """
    target_ref = _as_escrow_ref(services, target)
    if target_ref is None:
        return
    after: str | None = None
    while ids := services.db.recordings_to_promote(
        tenant.id, target, target_ref, after=after, limit=PAGE
    ):
        for rec_id in ids:
            after = rec_id
            old = services.db.recording(rec_id).kms_key_id
            keep = _as_escrow_ref(services, old)
            if services.db.promote_escrow_copy(
                rec_id,
                target=target,
                target_ref=target_ref,
                keep_old_as=keep if keep in refs else None,
                audit={
                    "action": "rotate",
                    "user_id": user_id,
                    "success": True,
                    "details": {"step": "promote_escrow", "from_key": old, "to_key": target},
                },
            ):
                summary.promoted += 1


def _rewrap_escrow(services: Services, rec_id: str, refs: Sequence[str], user_id: str) -> str:
    """Give one recording exactly the escrow copies ``refs``; returns the counter to bump."""
    for _ in range(_CAS_ATTEMPTS):
        rec = services.db.recording(rec_id)
        if rec.status != "stored" or not rec.encrypted_dek:
            return "gone"
        have = dict(services.db.escrow_deks(rec.id))
        missing = [r for r in refs if r not in have]
        extra = [r for r in have if r not in refs]
        context = encryption_context(rec.tenant_id, rec.id)
        added: list[tuple[str, bytes]] = []
        if missing:
            data_key = _data_key(services, rec, have, context)
            added = [(r, edk_to_bytes(services.escrow.wrap(r, data_key, context))) for r in missing]
            del data_key
        if services.db.update_escrow_deks(
            rec.id,
            primary_dek=rec.encrypted_dek,
            add=added,
            remove=extra,
            audit={
                "action": "rotate",
                "user_id": user_id,
                "success": True,
                "details": {"step": "escrow", "added": missing, "removed": extra},
            },
        ):
            crash_point("escrow")
            return "escrow_rewrapped"
    raise InvalidState(f"recording {rec_id} kept changing while its escrow copies were written")


def _data_key(
    services: Services, rec: Recording, have: dict[str, bytes], context: dict[str, str]
) -> bytes:
    """The data key from the primary copy, or from an escrow copy if the primary key is gone."""
    try:
        return services.keys.decrypt_data_key([edk_from_bytes(rec.encrypted_dek_bytes())], context)
    except KeyAccessError as exc:
        for ref, raw in have.items():
            try:
                return services.escrow.unwrap(ref, edk_from_bytes(raw), context)
            except KeyAccessError:
                continue
        raise exc from None


@dataclass
class EscrowVerifyReport:
    checked: int = 0
    ok: int = 0
    total_stored: int = 0
    # Per escrow key: recordings it opened / failed to open.
    keys: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    # Objects stored before the escrow key was added: the database copy opens
    # them, the object's own header does not carry that key's EDK.
    header_without_escrow: list[str] = field(default_factory=list)
    tenants_without_escrow: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_escrow(
    services: Services,
    *,
    user_id: str,
    tenant_name: str | None = None,
    progress: ProgressCallback | None = None,
) -> EscrowVerifyReport:
    """Prove that every stored recording opens with each of its tenant's escrow keys alone.

    For each recording and escrow key: the escrow copy of the data key in
    the database unwraps with that key only, commits to the object's header
    and authenticates it (so it is this object's data key), and when the
    header carries that key's own EDK it unwraps to the same data key.
    One audit row per failure and one per run.
    """
    started = time.monotonic()
    report = EscrowVerifyReport()
    tenants = [services.db.tenant_by_name(tenant_name)] if tenant_name else services.db.tenants()
    if tenant_name and not tenants[0].escrow_key_ids:
        raise ConfigError(
            f"tenant {tenant_name!r} has no escrow keys",
            hint="Add them with 'fsrecrypt tenants set-keys NAME --key KEY --escrow-key KEY2'.",
        )
    work: list[tuple[Tenant, str]] = []
    for tenant in tenants:
        if not tenant.escrow_key_ids:
            report.tenants_without_escrow.append(tenant.name)
            continue
        for ref in tenant.escrow_key_ids:
            report.keys[ref] = {"ok": 0, "failed": 0}
        work += [(tenant, rec_id) for rec_id in _stored_ids(services, tenant.id)]
    report.total_stored = len(work)
    if progress is not None:
        progress(0, len(work))
    for done, (tenant, rec_id) in enumerate(work, start=1):
        rec = services.db.recording(rec_id)
        if rec.status == "stored":
            report.checked += 1
            try:
                _verify_one(services, tenant, rec, report)
            except FsrecryptError as exc:
                report.failures[rec.id] = f"{exc.message} [{type(exc).__name__}]"
                services.db.audit(
                    action="verify_escrow",
                    user_id=user_id,
                    success=False,
                    recording_id=rec.id,
                    tenant_id=rec.tenant_id,
                    error_message=report.failures[rec.id],
                    details={"object_key": rec.s3_path},
                )
            else:
                report.ok += 1
        if progress is not None:
            progress(done, len(work))
    report.seconds = round(time.monotonic() - started, 3)
    services.db.audit(
        action="verify_escrow",
        user_id=user_id,
        success=not report.failures,
        tenant_id=tenants[0].id if tenant_name else None,
        error_message=f"{len(report.failures)} recording(s) failed" if report.failures else None,
        details={
            "checked": report.checked,
            "ok": report.ok,
            "failed": len(report.failures),
            "keys": report.keys,
            "header_without_escrow": len(report.header_without_escrow),
            "failed_ids": sorted(report.failures)[:100],
        },
    )
    return report


def _verify_one(
    services: Services, tenant: Tenant, rec: Recording, report: EscrowVerifyReport
) -> None:
    key = rec.s3_path or ""
    info = services.store.head(key)
    header = read_object_header(services.store, key, info.size)
    context = encryption_context(rec.tenant_id, rec.id)
    if dict(header.encryption_context) != context:
        raise ObjectMismatch(f"header: object {key} belongs to another recording or tenant")
    copies = dict(services.db.escrow_deks(rec.id))
    in_header = {services.escrow.ref_for_edk(e): e for e in header.encrypted_data_keys}
    problems: list[str] = []
    for ref in tenant.escrow_key_ids:
        try:
            if ref not in copies:
                raise InvalidState(
                    "no escrow copy of the data key (run 'fsrecrypt tenants set-keys' again)"
                )
            data_key = services.escrow.unwrap(ref, edk_from_bytes(copies[ref]), context)
            esdk.verify_header(header, data_key)
            if ref in in_header:
                if services.escrow.unwrap(ref, in_header[ref], context) != data_key:
                    raise ObjectMismatch("the header's escrow EDK holds another data key")
            elif rec.id not in report.header_without_escrow:
                report.header_without_escrow.append(rec.id)
        except FsrecryptError as exc:
            report.keys[ref]["failed"] += 1
            problems.append(f"{ref}: {exc.message} [{type(exc).__name__}]")
        else:
            report.keys[ref]["ok"] += 1
    if problems:
        raise KeyAccessError("escrow: " + "; ".join(problems))


def _stored_ids(services: Services, tenant_id: str) -> list[str]:
    with services.db.transaction("listing stored recordings") as cur:
        cur.execute(
            "SELECT id FROM call_recordings WHERE status = 'stored' AND tenant_id = %s ORDER BY id",
            (tenant_id,),
        )
        return [str(r[0]) for r in cur.fetchall()]
