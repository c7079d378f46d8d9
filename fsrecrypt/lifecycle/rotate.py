"""Key rotation: move a tenant to a new key without re-encrypting any audio.

The database copy of each data key is re-wrapped (KMS ReEncrypt, or unwrap +
wrap in memory for the keyring); with ``rewrite_headers`` each object also
gets a header wrapped by the new key (``fsrecrypt.lifecycle.rewrite``).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fsrecrypt.errors import FsrecryptError, InvalidState
from fsrecrypt.lifecycle.branch_keys import (
    BranchKeyMoveSummary,
    move_tenant_branch_key,
    on_branch_key,
)
from fsrecrypt.lifecycle.common import PAGE, ProgressCallback, crash_point, insert_audit
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


def _rows_needing_rotation(
    services: Services, tenant_id: str, target: str, rewrite: bool, after: str | None
) -> list[str]:
    where = [
        "tenant_id = %s",
        "status = 'stored'",
        "(kms_key_id IS DISTINCT FROM %s"
        " OR encryption_metadata ?| array['rotation_pending_object',"
        " 'rotation_superseded_object']"
        + (" OR encryption_metadata->>'header_key_id' IS DISTINCT FROM %s" if rewrite else "")
        + ")",
    ]
    params: list[Any] = [tenant_id, target] + ([target] if rewrite else [])
    if after is not None:
        where.append("id > %s")
        params.append(after)
    params.append(PAGE)
    with services.db.transaction("listing recordings to rotate") as cur:
        cur.execute(
            f"SELECT id FROM call_recordings WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY id LIMIT %s",
            params,
        )
        return [str(r[0]) for r in cur.fetchall()]


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


def rotate_tenant(
    services: Services,
    tenant_name: str,
    to_key: str,
    *,
    rewrite_headers: bool = False,
    user_id: str,
    progress: ProgressCallback | None = None,
) -> RotationSummary | BranchKeyMoveSummary:
    """Switch a tenant to ``to_key`` and re-wrap (optionally re-header) all its recordings.

    For a tenant on a branch key (``aws-kms-hierarchy``) ``to_key`` is a KMS
    key and only the branch key moves to it (``lifecycle.branch_keys``): a
    handful of KMS calls, no recording touched. A tenant still on a KMS key
    moves to a branch key (``to_key`` its id) the usual way, recording by
    recording.

    The tenant's key is switched first, so everything stored from now on
    (also by a running daemon) uses the new key. Then every stored recording
    whose database copy of the data key is wrapped by another key is
    re-wrapped (KMS ReEncrypt, or unwrap + wrap in memory for the keyring),
    each row in its own transaction with a compare-and-set on the old wrapped
    key. Passes repeat (up to three) so rows the daemon stored with the old
    key while the first pass ran are caught too.

    ``progress(done, total)`` hears about every recording handled (a later
    pass can push ``done`` past the first count of the work).
    """
    started = time.monotonic()
    tenant = services.db.tenant_by_name(tenant_name)
    if on_branch_key(services.config, tenant):
        return move_tenant_branch_key(
            services, tenant, to_key, rewrite_headers=rewrite_headers, user_id=user_id
        )
    summary = RotationSummary(tenant.name, to_key, tenant.kms_key_id, rewrite_headers)
    try:
        target = _canonical_key_id(services, to_key)
        if tenant.kms_key_id != to_key:
            services.db.set_tenant_key(tenant.id, to_key)
        summary.stored, todo = _count_rotation_work(services, tenant.id, target, rewrite_headers)
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, todo)

        if progress is not None:
            progress(0, todo)
        for _ in range(_MAX_ROTATION_PASSES):
            summary.passes += 1
            progressed = _rotation_pass(
                services, tenant.id, target, to_key, rewrite_headers, user_id, summary, step
            )
            _total, remaining = _count_rotation_work(services, tenant.id, target, rewrite_headers)
            summary.remaining = remaining
            if remaining == 0 or not progressed:
                break
    except FsrecryptError as exc:
        summary.seconds = round(time.monotonic() - started, 3)
        services.db.audit(
            action="rotate",
            user_id=user_id,
            success=False,
            tenant_id=tenant.id,
            error_message=f"{type(exc).__name__}: {exc.message}",
            details={k: v for k, v in summary.as_dict().items() if k != "failures"},
        )
        raise
    summary.seconds = round(time.monotonic() - started, 3)
    failed = bool(summary.failures) or summary.remaining > 0
    services.db.audit(
        action="rotate",
        user_id=user_id,
        success=not failed,
        tenant_id=tenant.id,
        error_message=(f"{len(summary.failures)} recording(s) failed" if failed else None),
        details={**summary.as_dict(), "failures": dict(list(summary.failures.items())[:50])},
    )
    return summary


def _rotation_pass(
    services: Services,
    tenant_id: str,
    target: str,
    to_key: str,
    rewrite: bool,
    user_id: str,
    summary: RotationSummary,
    step: Callable[[], None],
) -> bool:
    progressed = False
    after: str | None = None
    while True:
        ids = _rows_needing_rotation(services, tenant_id, target, rewrite, after)
        if not ids:
            return progressed
        for rec_id in ids:
            after = rec_id
            if rec_id in summary.failures:
                continue
            try:
                outcome = rotate_recording(
                    services, rec_id, target, to_key, rewrite_headers=rewrite, user_id=user_id
                )
            except FsrecryptError as exc:
                summary.failures[rec_id] = f"{type(exc).__name__}: {exc.message}"
            else:
                progressed = True
                for name in outcome:
                    setattr(summary, name, getattr(summary, name) + 1)
            step()


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
