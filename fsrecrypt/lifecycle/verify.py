"""Verification: prove stored recordings are intact and readable, end to end."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fsrecrypt.db import Recording
from fsrecrypt.errors import (
    ConfigError,
    FsrecryptError,
    IntegrityError,
    InvalidState,
    KeyAccessError,
    NotFound,
)
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
from fsrecrypt.lifecycle.common import ProgressCallback, utc_now
from fsrecrypt.pipeline import Services, iter_plaintext, open_recording, read_object_header
from fsrecrypt.store import ObjectAccessDenied


class VerificationFailed(IntegrityError):
    """``verify`` found recordings that are missing, damaged or unreadable."""

    hint = (
        "Restore each named object from a backup or an earlier object version, "
        "or check the key provider for key errors"
    )


class VerificationNotPermitted(ObjectAccessDenied):
    """``verify`` could not read some objects (permission), and found nothing damaged."""


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    total_stored: int = 0
    bytes_verified: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    # Of ``failures``: the ones this process may not read (EACCES/EPERM, S3
    # AccessDenied). A permission, not damage: told apart, never "restore".
    denied: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_recording(services: Services, rec: Recording) -> int:
    """Check one stored recording end to end; returns the plaintext bytes authenticated.

    Raises a typed error whose message starts with the failing check: object
    (missing), size (object vs row), header (parse or context), key (unwrap),
    frames (authentication) or audio size (plaintext vs row).
    """
    key = rec.s3_path or ""
    try:
        info = services.store.head(key)
    except FsrecryptError as exc:
        raise type(exc)(f"object: {exc.message}", hint=exc.hint) from None
    if rec.encrypted_size_bytes is not None and info.size != rec.encrypted_size_bytes:
        raise IntegrityError(
            f"size: object {key} is {info.size} bytes, the row says {rec.encrypted_size_bytes}"
        )
    try:
        read_object_header(services.store, key, info.size)
    except FsrecryptError as exc:
        raise type(exc)(f"header: {exc.message}", hint=exc.hint) from None
    try:
        opened = open_recording(services, rec)
    except FsrecryptError as exc:
        stage = "key" if isinstance(exc, KeyAccessError) else "header"
        raise type(exc)(f"{stage}: {exc.message}", hint=exc.hint) from None
    total = 0
    try:
        for chunk in iter_plaintext(services, opened):
            total += len(chunk)
    except FsrecryptError as exc:
        raise type(exc)(f"frames: {exc.message}", hint=exc.hint) from None
    if rec.file_size_bytes is not None and total != rec.file_size_bytes:
        raise IntegrityError(
            f"audio size: decrypted {total} bytes, the row says {rec.file_size_bytes}"
        )
    return total


def start_verify(
    services: Services,
    *,
    user_id: str,
    tenant_name: str | None = None,
    sample_percent: float = 100.0,
) -> Job:
    """Create the verification job: one item per stored recording (or per sampled one)."""
    if not 0 < sample_percent <= 100:
        raise ConfigError(
            f"--sample {sample_percent} is not a percentage in (0, 100]",
            hint="Use e.g. --sample 5 to check 5% of the recordings.",
        )
    tenant_id = services.db.tenant_by_name(tenant_name).id if tenant_name else None
    where = "status = 'stored'" + (" AND tenant_id = %s" if tenant_id else "")
    args: list[Any] = [tenant_id] if tenant_id else []
    with services.db.transaction("counting stored recordings") as cur:
        cur.execute(f"SELECT count(*) FROM call_recordings WHERE {where}", args)  # noqa: S608
        total = int(cur.fetchone()[0])
    query = f"SELECT id FROM call_recordings WHERE {where} ORDER BY id"  # noqa: S608
    if sample_percent < 100 and total:
        count = max(1, math.ceil(total * sample_percent / 100))
        query = (
            f"SELECT id FROM (SELECT id FROM call_recordings WHERE {where}"  # noqa: S608
            " ORDER BY random() LIMIT %s) s ORDER BY id"
        )
        args = [*args, count]
    params = {
        "user_id": user_id,
        "tenant": tenant_name,
        "tenant_id": tenant_id,
        "sample_percent": sample_percent,
        "total_stored": total,
    }
    items = ({"id": str(row[0])} for row in services.db.stream_rows(query, args))
    return create_job(services, "verify", params, items, user_id=user_id)


def verify_recordings(
    services: Services,
    *,
    user_id: str,
    tenant_name: str | None = None,
    sample_percent: float = 100.0,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Verify all (or a random sample of) stored recordings; one audit row per run.

    Creates the job (``start_verify``) and works it in this process;
    ``progress(done, total)`` hears about every recording checked.
    """
    job = start_verify(
        services, user_id=user_id, tenant_name=tenant_name, sample_percent=sample_percent
    )
    return verify_report(run_job(services, job.id, progress=progress))


def verify_report(job: Job) -> VerifyReport:
    """The report a finished verification job recorded."""
    if job.result is None:
        raise InvalidState(f"verification job {job.id} is {job.state}: {job.error or 'no result'}")
    return VerifyReport(**job.result)


def _handle(ctx: JobContext, payload: dict[str, Any]) -> Outcome:
    services = ctx.services
    try:
        rec = services.db.recording(str(payload["id"]))
    except NotFound:
        return skipped("no longer exists")
    if rec.status != "stored":
        return skipped(f"now {rec.status}")
    try:
        verified = verify_recording(services, rec)
    except FsrecryptError as exc:
        why = f"{exc.message} [{type(exc).__name__}]"
        services.db.audit(
            action="verify",
            user_id=ctx.params["user_id"],
            success=False,
            recording_id=rec.id,
            tenant_id=rec.tenant_id,
            error_message=why,
            details={"object_key": rec.s3_path},
        )
        return failed(why, denied=isinstance(exc, ObjectAccessDenied))
    return done("ok", bytes=verified)


def _finish(ctx: JobContext, finished: FinishedJob) -> dict[str, Any]:
    p = ctx.params
    report = VerifyReport(total_stored=int(p.get("total_stored", 0)))
    for item in finished.items():
        result = item.result or {}
        if item.state == "done":
            report.checked += 1
            report.ok += 1
            report.bytes_verified += int(result.get("bytes", 0))
        elif item.state == "failed":
            report.checked += 1
            rec_id = str(item.payload.get("id"))
            report.failures[rec_id] = item.message or "failed"
            if result.get("denied"):
                report.denied.append(rec_id)
    started = ctx.job.started_at or ctx.job.created_at
    report.seconds = round((utc_now() - started).total_seconds(), 3)
    ctx.services.db.audit(
        action="verify",
        user_id=p["user_id"],
        success=not report.failures,
        tenant_id=p.get("tenant_id"),
        error_message=f"{len(report.failures)} recording(s) failed" if report.failures else None,
        details={
            "checked": report.checked,
            "ok": report.ok,
            "failed": len(report.failures),
            "permission_denied": len(report.denied),
            "sample_percent": p.get("sample_percent"),
            "failed_ids": sorted(report.failures)[:100],
            "job": ctx.job.id,
        },
    )
    return report.as_dict()


JOB_KIND = JobKind(
    "verify",
    _handle,
    _finish,
    description="prove stored recordings decrypt end to end",
    retry_transient=False,
)
