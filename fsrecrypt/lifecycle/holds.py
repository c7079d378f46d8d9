"""Legal holds: recordings on hold cannot be erased or expired.

Holds are rows of ``legal_holds``; releasing one keeps the row as history.
With ``[storage] object_lock`` each hold is also an S3 Object Lock legal
hold on the recording's object, so the storage itself refuses to delete it.
"""

from __future__ import annotations

from typing import Any

from fsrecrypt.errors import ConfigError, InvalidState, NotFound
from fsrecrypt.lifecycle.common import (
    active_holds,
    insert_audit,
    iso,
    lock_recording,
    select_recordings,
)
from fsrecrypt.pipeline import Services


class LegalHoldActive(InvalidState):
    """A legal hold forbids destroying the recording."""

    hint = (
        "Recordings under legal hold cannot be erased or expired; release the hold with "
        "'fsrecrypt hold remove' once counsel allows it"
    )


def _selected(
    services: Services,
    recording_id: str | None,
    call_uuid: str | None,
    reason: str,
    no_reason: ConfigError,
) -> list[Any]:
    """The recordings a hold command names, after the checks both commands share."""
    if not reason.strip():
        raise no_reason
    if bool(recording_id) == bool(call_uuid):
        raise ConfigError("name exactly one of --recording or --call", hint="Pass one selector.")
    return select_recordings(services, recording_id=recording_id, call_uuid=call_uuid)


def add_hold(
    services: Services,
    *,
    reason: str,
    user_id: str,
    recording_id: str | None = None,
    call_uuid: str | None = None,
) -> list[dict[str, Any]]:
    """Place a legal hold on a recording (or every recording of a call).

    Idempotent: a recording already on hold keeps its existing hold and is
    reported as such. Erased recordings cannot be held (nothing is left).
    """
    recordings = _selected(
        services,
        recording_id,
        call_uuid,
        reason,
        ConfigError("a legal hold needs a --reason", hint="Say why, e.g. the case number."),
    )
    results = []
    for rec in recordings:
        with services.db.transaction("placing a legal hold") as cur:
            locked = lock_recording(cur, rec.id)
            if locked is None:
                raise NotFound(f"no recording with id {rec.id!r}")
            status, tenant_id, _meta = locked
            if status == "erased":
                results.append({"recording_id": rec.id, "status": "erased"})
                continue
            existing = active_holds(cur, [rec.id])
            if existing:
                results.append({"recording_id": rec.id, "status": "already held"})
                continue
            # The storage's own hold first: if the row then fails, the object is
            # over-protected (safe), never the other way round.
            versions = services.store.set_legal_hold(rec.s3_path, True) if rec.s3_path else 0
            cur.execute(
                "INSERT INTO legal_holds (recording_id, tenant_id, reason, placed_by)"
                " VALUES (%s, %s, %s, %s) RETURNING id",
                (rec.id, tenant_id, reason, user_id),
            )
            hold_id = int(cur.fetchone()[0])
            insert_audit(
                services,
                cur,
                action="hold_add",
                user_id=user_id,
                success=True,
                recording_id=rec.id,
                tenant_id=tenant_id,
                details={"hold_id": hold_id, "reason": reason, "storage_hold_versions": versions},
            )
        result: dict[str, Any] = {"recording_id": rec.id, "status": "held", "hold_id": hold_id}
        if services.store.object_lock:
            result["storage_legal_hold"] = f"on ({versions} version(s))"
        results.append(result)
    if all(r["status"] == "erased" for r in results):
        raise InvalidState(
            "recording(s) "
            + ", ".join(r["recording_id"] for r in results)
            + " were erased; there is nothing left to hold",
            hint="See the deletion receipt in the audit log.",
        )
    return results


def remove_hold(
    services: Services,
    *,
    reason: str,
    user_id: str,
    recording_id: str | None = None,
    call_uuid: str | None = None,
) -> list[dict[str, Any]]:
    """Release the active hold(s); the hold rows stay as history."""
    recordings = _selected(
        services,
        recording_id,
        call_uuid,
        reason,
        ConfigError("releasing a legal hold needs a --reason", hint="Say why, e.g. 'case closed'."),
    )
    results = []
    for rec in recordings:
        with services.db.transaction("releasing a legal hold") as cur:
            locked = lock_recording(cur, rec.id)
            if locked is None:
                raise NotFound(f"no recording with id {rec.id!r}")
            cur.execute(
                "UPDATE legal_holds SET released_at = now(), released_by = %s,"
                " release_reason = %s WHERE recording_id = %s AND released_at IS NULL"
                " RETURNING id",
                (user_id, reason, rec.id),
            )
            released = [int(r[0]) for r in cur.fetchall()]
            if released:
                insert_audit(
                    services,
                    cur,
                    action="hold_remove",
                    user_id=user_id,
                    success=True,
                    recording_id=rec.id,
                    tenant_id=locked[1],
                    details={"hold_ids": released, "reason": reason},
                )
        result = {"recording_id": rec.id, "status": "released" if released else "not held"}
        if released and rec.s3_path and services.store.object_lock:
            # After the row: if this fails the object stays held by the storage
            # (erase then says so), never released while the row still holds it.
            versions = services.store.set_legal_hold(rec.s3_path, False)
            result["storage_legal_hold"] = f"off ({versions} version(s))"
        results.append(result)
    if not any(r["status"] == "released" for r in results):
        raise NotFound(
            "no active legal hold on " + ", ".join(r["recording_id"] for r in results),
            hint="List active holds with 'fsrecrypt hold list'.",
        )
    return results


def list_holds(services: Services, *, tenant_name: str | None = None) -> list[dict[str, Any]]:
    """Active holds, oldest first."""
    params: list[Any] = []
    where = "h.released_at IS NULL"
    if tenant_name:
        where += " AND h.tenant_id = %s"
        params.append(services.db.tenant_by_name(tenant_name).id)
    with services.db.transaction("listing legal holds") as cur:
        cur.execute(
            "SELECT h.id, h.recording_id, t.name, r.call_uuid, h.reason, h.placed_by,"  # noqa: S608
            " h.placed_at FROM legal_holds h JOIN tenants t ON t.id = h.tenant_id"
            " JOIN call_recordings r ON r.id = h.recording_id"
            f" WHERE {where} ORDER BY h.placed_at, h.id",
            params,
        )
        rows = cur.fetchall()
    return [
        {
            "hold_id": int(r[0]),
            "recording_id": str(r[1]),
            "tenant": r[2],
            "call_uuid": r[3],
            "reason": r[4],
            "placed_by": r[5],
            "placed_at": iso(r[6]),
        }
        for r in rows
    ]
