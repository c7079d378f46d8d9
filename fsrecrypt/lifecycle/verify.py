"""Verification: prove stored recordings are intact and readable, end to end."""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fsrecrypt.db import Recording
from fsrecrypt.errors import ConfigError, FsrecryptError, IntegrityError, KeyAccessError, NotFound
from fsrecrypt.lifecycle.common import ProgressCallback
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


def verify_recordings(
    services: Services,
    *,
    user_id: str,
    tenant_name: str | None = None,
    sample_percent: float = 100.0,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Verify all (or a random sample of) stored recordings; one audit row per run.

    ``progress(done, total)`` hears about every recording checked.
    """
    if not 0 < sample_percent <= 100:
        raise ConfigError(
            f"--sample {sample_percent} is not a percentage in (0, 100]",
            hint="Use e.g. --sample 5 to check 5% of the recordings.",
        )
    started = time.monotonic()
    tenant_id = services.db.tenant_by_name(tenant_name).id if tenant_name else None
    ids = _stored_ids(services, tenant_id)
    report = VerifyReport(total_stored=len(ids))
    if sample_percent < 100 and ids:
        count = max(1, math.ceil(len(ids) * sample_percent / 100))
        ids = sorted(random.SystemRandom().sample(ids, count))
    if progress is not None:
        progress(0, len(ids))
    done = 0
    for rec_id in ids:
        try:
            rec = services.db.recording(rec_id)
        except NotFound:
            continue
        if rec.status != "stored":
            continue
        report.checked += 1
        try:
            report.bytes_verified += verify_recording(services, rec)
        except FsrecryptError as exc:
            report.failures[rec.id] = f"{exc.message} [{type(exc).__name__}]"
            if isinstance(exc, ObjectAccessDenied):
                report.denied.append(rec.id)
            services.db.audit(
                action="verify",
                user_id=user_id,
                success=False,
                recording_id=rec.id,
                tenant_id=rec.tenant_id,
                error_message=report.failures[rec.id],
                details={"object_key": rec.s3_path},
            )
        else:
            report.ok += 1
        done += 1
        if progress is not None:
            progress(done, len(ids))
    report.seconds = round(time.monotonic() - started, 3)
    services.db.audit(
        action="verify",
        user_id=user_id,
        success=not report.failures,
        tenant_id=tenant_id,
        error_message=f"{len(report.failures)} recording(s) failed" if report.failures else None,
        details={
            "checked": report.checked,
            "ok": report.ok,
            "failed": len(report.failures),
            "permission_denied": len(report.denied),
            "sample_percent": sample_percent,
            "failed_ids": sorted(report.failures)[:100],
        },
    )
    return report


def _stored_ids(services: Services, tenant_id: str | None) -> list[str]:
    with services.db.transaction("listing stored recordings") as cur:
        if tenant_id is None:
            cur.execute("SELECT id FROM call_recordings WHERE status = 'stored' ORDER BY id")
        else:
            cur.execute(
                "SELECT id FROM call_recordings WHERE status = 'stored' AND tenant_id = %s"
                " ORDER BY id",
                (tenant_id,),
            )
        return [str(r[0]) for r in cur.fetchall()]
