"""Key rotation: move a tenant to a new key without re-encrypting any audio.

The database copy of each data key is re-wrapped (KMS ReEncrypt, or unwrap +
wrap in memory for the keyring); with ``rewrite_headers`` each object also
gets a header wrapped by the new key (``fsrecrypt.lifecycle.rewrite``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from fsrecrypt.errors import FsrecryptError, InvalidState
from fsrecrypt.jobs import (
    FinishedJob,
    Job,
    JobContext,
    JobKind,
    Outcome,
    create_job,
    done,
    run_job,
    skipped,
)
from fsrecrypt.lifecycle.common import ProgressCallback, crash_point, insert_audit, utc_now
from fsrecrypt.lifecycle.rewrite import finish_header_leftovers, rewrite_header
from fsrecrypt.pipeline import Services, edk_from_bytes, edk_to_bytes, encryption_context

_MAX_ROTATION_PASSES = 3


class RotationIncomplete(FsrecryptError):
    """Some recordings could not be re-wrapped or rewritten."""

    hint = (
        "Fix the cause named for each recording and run the same rotate command again; "
        "it resumes and skips what is done"
    )
    transient = True


@dataclass
class RotationSummary:
    tenant: str
    to_key: str
    previous_tenant_key: str
    rewrite_headers: bool
    stored: int = 0
    rewrapped: int = 0
    already_current: int = 0
    headers_rewritten: int = 0
    headers_current: int = 0
    leftovers_cleaned: int = 0
    gone: int = 0
    passes: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    remaining: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _canonical_key_id(services: Services, key_id: str) -> str:
    """The id rows record for ``key_id`` (an ARN for KMS, the key id for the keyring).

    A throw-away data key is generated with the target key: that proves the
    key can wrap right now and tells us the id the provider records for it,
    so a KMS alias given on the command line compares equal to the ARN the
    daemon writes into new rows.
    """
    services.keys.check_key(key_id)
    probe = services.keys.generate_data_key(key_id, {"fsrecrypt-purpose": "rotation-probe"})
    return probe.key_id


def _needing_rotation_sql(rewrite: bool) -> str:
    return (
        "tenant_id = %s AND status = 'stored'"
        " AND (kms_key_id IS DISTINCT FROM %s"
        " OR encryption_metadata ?| array['rotation_pending_object',"
        " 'rotation_superseded_object']"
        + (" OR encryption_metadata->>'header_key_id' IS DISTINCT FROM %s" if rewrite else "")
        + ")"
    )


def _rows_needing_rotation(
    services: Services, tenant_id: str, target: str, rewrite: bool
) -> Iterator[dict[str, Any]]:
    """The job's items: ``{"id": recording_id}`` per row to rotate, streamed in id order."""
    params: list[Any] = [tenant_id, target] + ([target] if rewrite else [])
    for row in services.db.stream_rows(
        f"SELECT id FROM call_recordings WHERE {_needing_rotation_sql(rewrite)}"  # noqa: S608
        " ORDER BY id",
        params,
    ):
        yield {"id": str(row[0])}


def _count_rotation_work(
    services: Services, tenant_id: str, target: str, rewrite: bool
) -> tuple[int, int]:
    """(stored rows of the tenant, rows still needing work)."""
    extra = " OR encryption_metadata->>'header_key_id' IS DISTINCT FROM %s" if rewrite else ""
    params: list[Any] = [target] + ([target] if rewrite else []) + [tenant_id]
    with services.db.transaction("counting recordings to rotate") as cur:
        cur.execute(
            "SELECT count(*), count(*) FILTER (WHERE kms_key_id IS DISTINCT FROM %s"  # noqa: S608
            " OR encryption_metadata ?| array['rotation_pending_object',"
            f" 'rotation_superseded_object']{extra})"
            " FROM call_recordings WHERE status = 'stored' AND tenant_id = %s",
            params,
        )
        total, todo = cur.fetchone()
    return int(total), int(todo)


def start_rotation(
    services: Services,
    tenant_name: str,
    to_key: str,
    *,
    rewrite_headers: bool = False,
    user_id: str,
) -> Job:
    """Switch the tenant to ``to_key`` and create the job re-wrapping its recordings.

    The tenant's key is switched first, so everything stored from now on
    (also by a running daemon) uses the new key. An unfinished rotation job
    of the same tenant, key and mode is resumed instead of starting over.
    """
    tenant = services.db.tenant_by_name(tenant_name)
    try:
        target = _canonical_key_id(services, to_key)
        previous = tenant.kms_key_id
        if tenant.kms_key_id != to_key:
            services.db.set_tenant_key(tenant.id, to_key)
        for job in services.db.jobs(limit=1000, active_only=True):
            p = job.params
            if job.kind == "rotate" and (p.get("tenant_id"), p.get("target")) == (
                tenant.id,
                target,
            ):
                if p.get("rewrite_headers") == rewrite_headers and job.state == "running":
                    return job
        stored, _todo = _count_rotation_work(services, tenant.id, target, rewrite_headers)
        params = {
            "tenant": tenant.name,
            "tenant_id": tenant.id,
            "to_key": to_key,
            "target": target,
            "previous_tenant_key": previous,
            "rewrite_headers": rewrite_headers,
            "user_id": user_id,
            "stored": stored,
        }
        return create_job(
            services,
            "rotate",
            params,
            _rows_needing_rotation(services, tenant.id, target, rewrite_headers),
            user_id=user_id,
        )
    except FsrecryptError as exc:
        summary = RotationSummary(tenant.name, to_key, tenant.kms_key_id, rewrite_headers)
        services.db.audit(
            action="rotate",
            user_id=user_id,
            success=False,
            tenant_id=tenant.id,
            error_message=f"{type(exc).__name__}: {exc.message}",
            details={k: v for k, v in summary.as_dict().items() if k != "failures"},
        )
        raise


def rotate_tenant(
    services: Services,
    tenant_name: str,
    to_key: str,
    *,
    rewrite_headers: bool = False,
    user_id: str,
    progress: ProgressCallback | None = None,
) -> RotationSummary:
    """Switch a tenant to ``to_key`` and re-wrap (optionally re-header) all its recordings.

    Creates the rotation job (``start_rotation``) and works it in this
    process (``fsrecrypt worker`` processes may help). Every stored
    recording whose database copy of the data key is wrapped by another key
    is re-wrapped (KMS ReEncrypt, or unwrap + wrap in memory for the
    keyring), each row in its own transaction with a compare-and-set on the
    old wrapped key. When the items are done, up to two more passes catch
    rows the daemon stored with the old key meanwhile.

    ``progress(done, total)`` hears about every recording handled.
    """
    job = start_rotation(
        services, tenant_name, to_key, rewrite_headers=rewrite_headers, user_id=user_id
    )
    return rotation_summary(run_job(services, job.id, progress=progress))


def rotation_summary(job: Job) -> RotationSummary:
    """The summary a finished rotation job recorded."""
    if job.result is None:
        raise RotationIncomplete(
            f"rotation job {job.id} is {job.state}: {job.error or 'no result'}"
        )
    return RotationSummary(**job.result)


def _handle(ctx: JobContext, payload: dict[str, Any]) -> Outcome:
    p = ctx.params
    outcome = rotate_recording(
        ctx.services,
        str(payload["id"]),
        p["target"],
        p["to_key"],
        rewrite_headers=bool(p["rewrite_headers"]),
        user_id=p["user_id"],
    )
    if outcome == ["gone"]:
        return skipped("no longer stored", outcome=outcome)
    return done(",".join(outcome), outcome=outcome)


def _finish(ctx: JobContext, finished: FinishedJob) -> dict[str, Any]:
    """Sum the items up, catch rows stored with the old key meanwhile, write the audit row."""
    services, p = ctx.services, ctx.params
    summary = RotationSummary(
        p["tenant"], p["to_key"], p["previous_tenant_key"], p["rewrite_headers"]
    )
    summary.stored = int(p.get("stored", 0))
    summary.passes = 1
    for item in finished.items():
        if item.state == "failed":
            summary.failures[str(item.payload.get("id"))] = item.message or "failed"
        for name in (item.result or {}).get("outcome", []):
            if name in _COUNTERS:
                setattr(summary, name, getattr(summary, name) + 1)
    tenant_id, target, rewrite = p["tenant_id"], p["target"], bool(p["rewrite_headers"])
    for _ in range(_MAX_ROTATION_PASSES - 1):
        leftovers = [
            i["id"]
            for i in _rows_needing_rotation(services, tenant_id, target, rewrite)
            if i["id"] not in summary.failures
        ]
        if not leftovers:
            break
        summary.passes += 1
        for rec_id in leftovers:
            try:
                names = rotate_recording(
                    services,
                    rec_id,
                    target,
                    p["to_key"],
                    rewrite_headers=rewrite,
                    user_id=p["user_id"],
                )
            except FsrecryptError as exc:
                summary.failures[rec_id] = f"{type(exc).__name__}: {exc.message}"
                continue
            for name in names:
                setattr(summary, name, getattr(summary, name) + 1)
    _total, summary.remaining = _count_rotation_work(services, tenant_id, target, rewrite)
    started = ctx.job.started_at or ctx.job.created_at
    summary.seconds = round((utc_now() - started).total_seconds(), 3)
    failed_ = bool(summary.failures) or summary.remaining > 0
    services.db.audit(
        action="rotate",
        user_id=p["user_id"],
        success=not failed_,
        tenant_id=tenant_id,
        error_message=(f"{len(summary.failures)} recording(s) failed" if failed_ else None),
        details={
            **summary.as_dict(),
            "failures": dict(list(summary.failures.items())[:50]),
            "job": ctx.job.id,
        },
    )
    return summary.as_dict()


_COUNTERS = (
    "rewrapped",
    "already_current",
    "headers_rewritten",
    "headers_current",
    "leftovers_cleaned",
    "gone",
)
JOB_KIND = JobKind(
    "rotate",
    _handle,
    _finish,
    description="re-wrap (and optionally re-header) a tenant's recordings under a new key",
    retry_transient=False,
)


def rotate_recording(
    services: Services,
    recording_id: str,
    target: str,
    to_key: str,
    *,
    rewrite_headers: bool,
    user_id: str,
) -> list[str]:
    """Bring one recording to the target key; returns the summary counters to bump.

    Safe to call any number of times: every step checks what is already done.
    """
    outcome: list[str] = []
    rec = services.db.recording(recording_id)
    if rec.status != "stored":
        return ["gone"]
    if finish_header_leftovers(services, rec):
        outcome.append("leftovers_cleaned")
        rec = services.db.recording(recording_id)
    context = encryption_context(rec.tenant_id, rec.id)
    if rec.kms_key_id != target:
        old_b64 = rec.encrypted_dek or ""
        new_edk = services.keys.rewrap(edk_from_bytes(rec.encrypted_dek_bytes()), context, to_key)
        new_b64 = _b64(edk_to_bytes(new_edk))
        recorded = services.keys.key_for_edk(new_edk) or target
        with services.db.transaction("re-wrapping a data key") as cur:
            cur.execute(
                "UPDATE call_recordings SET encrypted_dek = %s, kms_key_id = %s,"
                " updated_at = now(), encryption_metadata = encryption_metadata || %s::jsonb"
                " WHERE id = %s AND status = 'stored' AND encrypted_dek = %s",
                (
                    new_b64,
                    recorded,
                    json.dumps({"previous_kms_key_id": rec.kms_key_id}),
                    rec.id,
                    old_b64,
                ),
            )
            swapped = cur.rowcount == 1
            if swapped:
                insert_audit(
                    services,
                    cur,
                    action="rotate",
                    user_id=user_id,
                    success=True,
                    recording_id=rec.id,
                    tenant_id=rec.tenant_id,
                    details={"from_key": rec.kms_key_id, "to_key": recorded, "step": "rewrap"},
                )
        if not swapped:
            # Erased, or re-wrapped by someone else meanwhile: look again.
            fresh = services.db.recording(recording_id)
            if fresh.status != "stored":
                return [*outcome, "gone"]
            if fresh.encrypted_dek == old_b64:
                raise InvalidState(f"recording {rec.id} could not be updated (row changed)")
            return rotate_recording(
                services,
                recording_id,
                target,
                to_key,
                rewrite_headers=rewrite_headers,
                user_id=user_id,
            )
        outcome.append("rewrapped")
        crash_point("rewrapped")
        rec = services.db.recording(recording_id)
    else:
        outcome.append("already_current")
    if rewrite_headers:
        outcome.append(rewrite_header(services, rec, target, user_id))
    return outcome


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
