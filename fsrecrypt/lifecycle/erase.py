"""Erasure (crypto-shredding), retention and expiry.

Erasing destroys the wrapped data key in the database first (so nothing
is decryptable through it), then deletes every version of every object copy,
then writes the audit row; a deletion receipt with its own hash is kept.
Legal holds and the retention period are checked before anything is destroyed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from fsrecrypt.db import Recording
from fsrecrypt.errors import ConfigError, FsrecryptError, InvalidState, NotFound, ObjectNotFound
from fsrecrypt.jobs import (
    FinishedJob,
    Job,
    JobContext,
    JobKind,
    Outcome,
    create_job,
    done,
    failed,
    run_job,
    skipped,
)
from fsrecrypt.lifecycle.common import (
    ROTATION_META_KEYS,
    ProgressCallback,
    active_holds,
    insert_audit,
    iso,
    lock_recording,
    select_recordings,
    utc_now,
)
from fsrecrypt.lifecycle.holds import LegalHoldActive
from fsrecrypt.pipeline import Services
from fsrecrypt.plaintext import remove_source_if_unchanged


class RetentionActive(InvalidState):
    """The recording is still inside its retention period."""

    hint = (
        "Wait until the retention period ([retention] days) has passed, or pass "
        "--override-retention (which is recorded in the audit log) if erasure is required "
        "now, e.g. for a GDPR erasure request"
    )


class StorageRetentionLocked(InvalidState):
    """S3 Object Lock keeps the object, and fsrecrypt may not (or cannot) bypass it."""

    hint = (
        "Wait until the storage retention named above has passed ('fsrecrypt expire' "
        "erases it then)"
    )


class ErasureIncomplete(FsrecryptError):
    """Some recordings were tombstoned but their objects could not all be deleted."""

    hint = (
        "Their data keys are destroyed already; run the same erase command again to "
        "retry deleting the objects"
    )
    transient = True


Confirm = Callable[[Sequence[Recording]], None]
"""Asked before anything is destroyed, with the recordings about to go; it
stops the operation by raising (the command line asks the operator)."""


def retention_ends(services: Services, rec: Recording) -> datetime | None:
    """When the recording's retention period ends; None if it never does (days = 0)."""
    days = services.config.retention.days
    if days <= 0:
        return None
    return rec.created_at + timedelta(days=days)


def _inside_retention(services: Services, rec: Recording, now: datetime) -> bool:
    ends = retention_ends(services, rec)
    return ends is None or now < ends


def receipt_hash(receipt: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of the receipt (without its own hash)."""
    body = {k: v for k, v in receipt.items() if k != "receipt_hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_erasable(
    services: Services,
    recordings: Sequence[Recording],
    *,
    override_retention: bool,
    now: datetime | None = None,
) -> None:
    """Refuse the whole request before anything is destroyed (holds, retention, pending)."""
    now = now or utc_now()
    live = [r for r in recordings if r.status != "erased"]
    pending = [r.id for r in live if r.status == "pending"]
    if pending:
        raise InvalidState(
            f"recording(s) {', '.join(pending)} are still being stored",
            hint="Wait until they are stored (or failed), then erase them.",
        )
    with services.db.transaction("checking legal holds") as cur:
        held = active_holds(cur, [r.id for r in live])
    if held:
        raise LegalHoldActive(
            "legal hold blocks erasure of "
            + ", ".join(f"{rid} ({reason})" for rid, reason in sorted(held.items()))
        )
    if not override_retention:
        inside = [r for r in live if _inside_retention(services, r, now)]
        if inside:
            days = services.config.retention.days
            period = f"{days} days" if days else "forever ([retention] days = 0)"
            first = inside[0]
            ends = retention_ends(services, first)
            until = f" (until {iso(ends)})" if ends else ""
            raise RetentionActive(
                f"{len(inside)} recording(s) are inside the retention period of {period}, "
                f"e.g. {first.id}{until}"
            )
    _check_storage_lock(services, live, now)


def _check_storage_lock(services: Services, live: Iterable[Recording], now: datetime) -> None:
    """Refuse, before anything is destroyed, an erasure the storage's Object Lock would refuse.

    Compliance retention can be shortened or bypassed by nobody, not even
    the bucket's root account: such a recording cannot be erased before its
    retain-until date, override or not. Governance retention is bypassed
    only if ``[storage] governance_bypass`` allows it. An S3 legal hold
    (left behind when releasing it failed) blocks erasure too.
    """
    store = services.store
    if not store.object_lock:
        return
    for rec in live:
        if not rec.s3_path or rec.status == "erased":
            continue
        try:
            state = store.lock_state(rec.s3_path)
        except ObjectNotFound:
            continue
        if state.legal_hold:
            raise LegalHoldActive(
                f"the S3 Object Lock legal hold on the object of {rec.id} blocks erasure "
                "(fsrecrypt has no active hold on it: releasing it in S3 failed earlier)",
                hint="Run 'fsrecrypt hold add' then 'hold remove' for it to release the S3 hold.",
            )
        if not state.retained_at(now):
            continue
        until = iso(state.retain_until)
        if state.mode == "compliance":
            raise StorageRetentionLocked(
                f"recording {rec.id} is under S3 Object Lock compliance retention until "
                f"{until}: nobody, not even the bucket's root account, can delete it earlier, "
                "so it cannot be erased (--override-retention cannot lift storage retention)"
            )
        if not store.governance_bypass:
            raise StorageRetentionLocked(
                f"recording {rec.id} is under S3 Object Lock governance retention until {until} "
                "and [storage] governance_bypass is false",
                hint=(
                    "Set [storage] governance_bypass = true (the credentials need "
                    "s3:BypassGovernanceRetention) and erase with --override-retention, "
                    f"or wait until {until}"
                ),
            )


def start_erasure(
    services: Services,
    recordings: Iterable[str],
    *,
    reason: str,
    user_id: str,
    override_retention: bool = False,
    action: str = "erase",
    extra: Mapping[str, Any] | None = None,
) -> Job:
    """Create the erasure job (kind ``erase`` or ``expire``): one item per recording id.

    The caller has run ``check_erasable`` on the selection; each item checks
    its own row again under a lock before destroying anything.
    """
    if not reason.strip():
        raise ConfigError("erasure needs a --reason", hint="Say why, e.g. the request ticket.")
    params = {
        "reason": reason,
        "user_id": user_id,
        "override_retention": override_retention,
        "action": action,
        "receipt_id": str(uuid.uuid4()),
        **(extra or {}),
    }
    items = ({"id": rec_id} for rec_id in recordings)
    return create_job(services, action, params, items, user_id=user_id)


def erase_recordings(
    services: Services,
    recordings: Sequence[Recording],
    *,
    reason: str,
    user_id: str,
    override_retention: bool = False,
    action: str = "erase",
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Crypto-shred and delete recordings; return the deletion receipt.

    Per recording: (1) in one transaction, with the row locked and the hold
    re-checked, the wrapped data key is destroyed (``encrypted_dek`` NULL),
    the row becomes ``erased`` and the names of every object copy are kept
    in its metadata; (2) every version of those objects is deleted; (3) the
    audit row is written. A crash after (1) leaves nothing decryptable through
    the database; running the command again repeats (2) for erased rows, so
    the object copies (whose headers still hold a wrapped key) go too. The
    audit rows of the recording are never touched. The work is a job
    (``start_erasure``) worked in this process.
    """
    if not reason.strip():
        raise ConfigError("erasure needs a --reason", hint="Say why, e.g. the request ticket.")
    check_erasable(services, recordings, override_retention=override_retention)
    job = start_erasure(
        services,
        (r.id for r in recordings),
        reason=reason,
        user_id=user_id,
        override_retention=override_retention,
        action=action,
    )
    return erasure_receipt(run_job(services, job.id, progress=progress))


def erasure_receipt(job: Job) -> dict[str, Any]:
    """The receipt a finished erasure job recorded; ``ErasureIncomplete`` if any item failed."""
    result = job.result or {}
    if "receipt" not in result:
        raise ErasureIncomplete(f"erasure job {job.id} is {job.state}: {job.error or 'unfinished'}")
    failures = result.get("failures") or {}
    if failures:
        raise ErasureIncomplete(
            f"{len(failures)} recording(s) were not completely erased: "
            + "; ".join(f"{rid}: {why}" for rid, why in failures.items())
        )
    return dict(result["receipt"])


def _handle(ctx: JobContext, payload: dict[str, Any]) -> Outcome:
    p, services = ctx.params, ctx.services
    rec_id = str(payload["id"])
    rec: Recording | None = None
    try:
        rec = services.db.recording(rec_id)
        entry = _erase_one(
            services,
            rec,
            reason=p["reason"],
            user_id=p["user_id"],
            override_retention=bool(p["override_retention"]),
            action=p["action"],
            receipt_id=p["receipt_id"],
        )
    except FsrecryptError as exc:
        why = f"{type(exc).__name__}: {exc.message}"
        services.db.audit(
            action=p["action"],
            user_id=p["user_id"],
            success=False,
            recording_id=rec_id,
            tenant_id=None if rec is None else rec.tenant_id,
            error_message=why,
            details={"reason": p["reason"], "receipt_id": p["receipt_id"]},
        )
        return failed(why)
    if entry is None:
        return skipped("already erased, nothing left to delete")
    return done("erased", **entry)


def _finish(ctx: JobContext, finished: FinishedJob) -> dict[str, Any]:
    """Build and keep the deletion receipt (its id fixed at creation: written once)."""
    p = ctx.params
    entries: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    for item in finished.items():
        if item.state == "done" and item.result:
            entries.append(dict(item.result))
        elif item.state == "failed":
            failures[str(item.payload.get("id"))] = item.message or "failed"
    receipt: dict[str, Any] = {
        "receipt_id": p["receipt_id"],
        "action": p["action"],
        "erased_at": iso(utc_now()),
        "operator": p["user_id"],
        "reason": p["reason"],
        "override_retention": p["override_retention"],
        "recordings": entries,
        "recording_ids": [e["recording_id"] for e in entries],
        "object_keys": [k for e in entries for k in e["object_keys"]],
        "versions_deleted": sum(e["versions_deleted"] for e in entries),
    }
    receipt["receipt_hash"] = receipt_hash(receipt)
    if entries:
        with ctx.services.db.transaction("keeping the deletion receipt") as cur:
            cur.execute(
                "INSERT INTO erasure_receipts (id, action, operator, reason, receipt,"
                " receipt_hash) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (
                    p["receipt_id"],
                    p["action"],
                    p["user_id"],
                    p["reason"],
                    json.dumps(receipt),
                    receipt["receipt_hash"],
                ),
            )
    if p["action"] == "expire":
        _audit_expiry(ctx, len(entries), failures)
    return {"receipt": receipt, "failures": failures}


def _audit_expiry(ctx: JobContext, erased: int, failures: Mapping[str, str]) -> None:
    p = ctx.params
    details = {"retention_days": p.get("retention_days"), "job": ctx.job.id}
    if failures:
        ctx.services.db.audit(
            action="expire",
            user_id=p["user_id"],
            success=False,
            error_message=f"ErasureIncomplete: {len(failures)} recording(s) were not "
            "completely erased",
            details={**details, "candidates": p.get("candidates"), "held": p.get("held_count")},
        )
        return
    ctx.services.db.audit(
        action="expire",
        user_id=p["user_id"],
        success=True,
        details={
            **details,
            "erased": erased,
            "held": p.get("held", []),
            "receipt_id": p["receipt_id"] if erased else None,
        },
    )


def start_erase_selected(
    services: Services,
    *,
    reason: str,
    user_id: str,
    recording_id: str | None = None,
    call_uuid: str | None = None,
    tenant_name: str | None = None,
    override_retention: bool = False,
    confirm: Confirm | None = None,
) -> Job:
    """The ``erase`` job for the recordings named by exactly one selector, after the checks.

    Holds, retention and pending rows are checked for the whole selection
    before ``confirm`` is asked, so an operator is never asked about an
    erasure that would be refused.
    """
    if not reason.strip():
        raise ConfigError("erasure needs a --reason", hint="Say why, e.g. the request ticket.")
    if tenant_name and not recording_id and not call_uuid:  # maybe millions: streamed
        from fsrecrypt.lifecycle.erase_select import TenantRecordings, check_tenant_erasable

        selection = TenantRecordings(services, services.db.tenant_by_name(tenant_name).id)
        if not selection:
            raise NotFound("no recordings match", hint="Check the tenant name.")
        check_tenant_erasable(services, selection, override_retention=override_retention)
        if confirm is not None:
            confirm(selection)
        return start_erasure(
            services,
            (item["id"] for item in selection.ids()),
            reason=reason,
            user_id=user_id,
            override_retention=override_retention,
        )
    recordings = select_recordings(
        services, recording_id=recording_id, call_uuid=call_uuid, tenant_name=tenant_name
    )
    if not recordings:
        raise NotFound("no recordings match", hint="Check the tenant name.")
    check_erasable(services, recordings, override_retention=override_retention)
    if confirm is not None:
        confirm(recordings)
    return start_erasure(
        services,
        (r.id for r in recordings),
        reason=reason,
        user_id=user_id,
        override_retention=override_retention,
    )


def erase_selected(
    services: Services,
    *,
    reason: str,
    user_id: str,
    recording_id: str | None = None,
    call_uuid: str | None = None,
    tenant_name: str | None = None,
    override_retention: bool = False,
    confirm: Confirm | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """``fsrecrypt erase``: ``start_erase_selected``, worked in this process; the receipt."""
    job = start_erase_selected(
        services,
        reason=reason,
        user_id=user_id,
        recording_id=recording_id,
        call_uuid=call_uuid,
        tenant_name=tenant_name,
        override_retention=override_retention,
        confirm=confirm,
    )
    return erasure_receipt(run_job(services, job.id, progress=progress))


def _erase_one(
    services: Services,
    rec: Recording,
    *,
    reason: str,
    user_id: str,
    override_retention: bool,
    action: str,
    receipt_id: str,
) -> dict[str, Any] | None:
    with services.db.transaction("tombstoning a recording") as cur:
        locked = lock_recording(cur, rec.id)
        if locked is None:
            raise NotFound(f"no recording with id {rec.id!r}")
        status, tenant_id, (meta, s3_path) = locked
        if active_holds(cur, [rec.id]):
            raise LegalHoldActive(f"legal hold blocks erasure of {rec.id}")
        if status == "pending":
            raise InvalidState(f"recording {rec.id} is still being stored")
        erasure = dict(meta.get("erasure") or {})
        already = status == "erased"
        # An erased row lists only the copies whose deletion has not been
        # confirmed yet; a live row's copies are its object and any copy a
        # killed key rotation left behind.
        objects = list(erasure.get("objects") or []) if already else []
        for candidate in [
            None if already else s3_path,
            *(meta.get(k) for k in ROTATION_META_KEYS),
        ]:
            if candidate and candidate not in objects:
                objects.append(candidate)
        if already and not objects:
            return None
        erasure.update(
            {"objects": objects, "reason": erasure.get("reason", reason), "receipt_id": receipt_id}
        )
        cur.execute(
            "UPDATE call_recordings SET status = 'erased', encrypted_dek = NULL,"
            " erased_at = coalesce(erased_at, now()), updated_at = now(),"
            " claimed_by = NULL, claimed_until = NULL,"
            " encryption_metadata = (encryption_metadata - 'rotation_pending_object'"
            " - 'rotation_superseded_object') || %s::jsonb"
            " WHERE id = %s",
            (json.dumps({"erasure": erasure}), rec.id),
        )
    versions = 0
    for key in objects:
        versions += services.store.delete(key)
    plaintext_deleted = remove_source_if_unchanged(
        rec.source_path, rec.source_fingerprint, services.config.freeswitch.recordings_dirs
    )
    with services.db.transaction("recording the erasure") as cur:
        cur.execute(
            "UPDATE call_recordings SET encryption_metadata = jsonb_set(encryption_metadata,"
            " '{erasure,objects}', '[]'::jsonb) || jsonb_build_object('erased_objects', %s::jsonb)"
            " WHERE id = %s AND status = 'erased'",
            (json.dumps(objects), rec.id),
        )
        insert_audit(
            services,
            cur,
            action=action,
            user_id=user_id,
            success=True,
            recording_id=rec.id,
            tenant_id=tenant_id,
            details={
                "reason": reason,
                "receipt_id": receipt_id,
                "object_keys": objects,
                "versions_deleted": versions,
                "override_retention": override_retention,
                "data_key_destroyed": not already,
                "plaintext_deleted": plaintext_deleted,
            },
        )
    return {
        "recording_id": rec.id,
        "tenant_id": tenant_id,
        "call_uuid": rec.call_uuid,
        "object_keys": objects,
        "versions_deleted": versions,
        "plaintext_deleted": plaintext_deleted,
        "previously_erased": already,
    }


def expiry_candidates(
    services: Services, *, now: datetime | None = None
) -> tuple[list[Recording], list[Recording]]:
    """(stored recordings past retention and not held, those past retention but held)."""
    days = services.config.retention.days
    if days <= 0:
        return [], []
    cutoff = (now or utc_now()) - timedelta(days=days)
    with services.db.transaction("finding expired recordings") as cur:
        cur.execute(
            "SELECT r.id, EXISTS (SELECT 1 FROM legal_holds h WHERE h.recording_id = r.id"
            " AND h.released_at IS NULL) FROM call_recordings r"
            " WHERE r.status = 'stored' AND r.created_at < %s ORDER BY r.created_at, r.id",
            (cutoff,),
        )
        rows = cur.fetchall()
    expired, held = [], []
    for rec_id, is_held in rows:
        rec = services.db.recording(str(rec_id))
        (held if is_held else expired).append(rec)
    return expired, held


def start_expiry(
    services: Services, *, user_id: str, dry_run: bool = False, confirm: Confirm | None = None
) -> tuple[dict[str, Any], Job | None]:
    """The expiry report, and the ``expire`` job erasing what is past retention (None if none).

    ``confirm`` is asked (unless ``dry_run``) when there is something to erase.
    """
    days = services.config.retention.days
    expired, held = expiry_candidates(services)
    if not dry_run and expired and confirm is not None:
        confirm(expired)
    report: dict[str, Any] = {
        "retention_days": days,
        "dry_run": dry_run,
        "expired": [r.id for r in expired],
        "held": [r.id for r in held],
    }
    if days <= 0:
        report["note"] = "[retention] days = 0: recordings are kept forever, nothing expires"
    if dry_run:
        return report, None
    if not expired:
        services.db.audit(
            action="expire",
            user_id=user_id,
            success=True,
            details={"retention_days": days, "erased": 0, "held": report["held"][:100]},
        )
        report["receipt"] = None
        return report, None
    try:
        check_erasable(services, expired, override_retention=False)
        job = start_erasure(
            services,
            (r.id for r in expired),
            reason=f"retention period of {days} days expired",
            user_id=user_id,
            action="expire",
            extra={
                "retention_days": days,
                "candidates": len(expired),
                "held_count": len(held),
                "held": report["held"][:100],
            },
        )
    except FsrecryptError as exc:
        services.db.audit(
            action="expire",
            user_id=user_id,
            success=False,
            error_message=f"{type(exc).__name__}: {exc.message}",
            details={"retention_days": days, "candidates": len(expired), "held": len(held)},
        )
        raise
    return report, job


def expire(
    services: Services,
    *,
    user_id: str,
    dry_run: bool = False,
    confirm: Confirm | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Erase every stored recording past retention that no legal hold protects.

    ``confirm`` is asked (unless ``dry_run``) when there is something to erase.
    """
    report, job = start_expiry(services, user_id=user_id, dry_run=dry_run, confirm=confirm)
    if job is not None:
        report["receipt"] = erasure_receipt(run_job(services, job.id, progress=progress))
    return report


def _kind(name: str) -> JobKind:
    return JobKind(
        name,
        _handle,
        _finish,
        description=f"{name}: crypto-shred recordings and keep one deletion receipt",
        retry_transient=False,
    )


JOB_KINDS = {"erase": _kind("erase"), "expire": _kind("expire")}
