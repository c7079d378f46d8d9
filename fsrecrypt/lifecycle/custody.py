"""Chain of custody: one recording's evidence, from its creation to now, as one document.

What an auditor or a court asks of a recording: what created it and when,
which host and process stored it, a keyed fingerprint of the audio (to prove
a decrypted copy identical), which object and version hold it, when and where
the plaintext was deleted, and every later access, rotation, hold and
erasure, each with its audit row id and the anchor that covers that row (so
the row is provably older than the anchor and cannot have been rewritten).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from fsrecrypt.db import Recording
from fsrecrypt.errors import FsrecryptError, IntegrityError
from fsrecrypt.lifecycle.common import ProgressCallback, iso
from fsrecrypt.pipeline import Services, iter_plaintext, open_recording
from fsrecrypt.pipeline.custody import FingerprintKey

_CREATED_BY = ("origin", "assigned_by", "adopted_by", "source", "event")
CHECK_CHUNK = 1024 * 1024


class FingerprintMismatch(IntegrityError):
    """``custody --check``: the file is not the recording that was stored."""

    hint = (
        "The file differs from the audio fsrecrypt encrypted (edited, re-encoded, or "
        "another recording); decrypt the recording again with 'fsrecrypt get' and compare"
    )


def _anchors_by_row(services: Services, tenant_id: str) -> Any:
    """A function row id -> the first anchor covering it (or None), for this tenant's chain."""
    if not services.config.audit.anchoring:
        return lambda _row_id, _chain: None
    from fsrecrypt.lifecycle.anchors import anchor_hash, read_anchors

    anchors = read_anchors(services.config)

    def covering(row_id: int, chain: str) -> dict[str, Any] | None:
        for stored, doc in anchors:
            for entry in doc["chains"]:
                if entry["chain"] == chain and entry["last_id"] >= row_id:
                    return {
                        "seq": doc["seq"],
                        "created_at": doc.get("created_at"),
                        "sha256": anchor_hash(doc),
                        "location": stored.location,
                    }
        return None

    return covering


def _event(row: dict[str, Any], covering: Any) -> dict[str, Any]:
    chain = str(row["tenant_id"]) if row["tenant_id"] else "global"
    return {
        "audit_row_id": int(row["id"]),
        "action": row["action"],
        "at": iso(row["accessed_at"]),
        "user": row["user_id"],
        "success": bool(row["success"]),
        "ip_address": str(row["ip_address"]) if row["ip_address"] else None,
        "error": row["error_message"],
        "details": row["details"],
        "row_hash": row["row_hash"],
        "anchor": covering(int(row["id"]), chain),
    }


def recording_custody(services: Services, recording_id: str, *, user_id: str) -> dict[str, Any]:
    """The custody document of one recording (see the module doc); the look-up is logged."""
    rec = services.db.recording(recording_id)
    columns = services.db.custody_columns(rec.id)
    rows = services.db.audit_rows(recording_id=rec.id)
    covering = _anchors_by_row(services, rec.tenant_id)
    events = [_event(r, covering) for r in rows]
    stored = next((e for e in events if e["action"] == "encrypt" and e["success"]), None)
    meta = dict(rec.encryption_metadata or {})
    doc: dict[str, Any] = {
        "recording_id": rec.id,
        "tenant_id": rec.tenant_id,
        "status": rec.status,
        "created": {
            "at": iso(rec.created_at),
            "call_uuid": rec.call_uuid,
            "core_uuid": rec.core_uuid,
            "source_path": rec.source_path,
            "by": "RECORD_STOP" if rec.core_uuid else "upload or backfill (fsrecrypt ingest)",
            "sweep": {k: meta[k] for k in _CREATED_BY if k in meta} or None,
        },
        "stored": {
            "at": iso(rec.stored_at),
            "worker": ((stored or {}).get("details") or {}).get("worker"),
            "by_user": (stored or {}).get("user"),
            "audit_row_id": (stored or {}).get("audit_row_id"),
            "object_key": rec.s3_path,
            "object_version": meta.get("object_version"),
            "store": meta.get("store"),
            "plaintext_bytes": rec.file_size_bytes,
            "encrypted_bytes": rec.encrypted_size_bytes,
            "kms_key_id": rec.kms_key_id,
        },
        "fingerprint": {
            "alg": "hmac-sha256 (per-tenant key derived on the server)",
            "value": columns["plaintext_hmac"],
            "key_id": columns["plaintext_hmac_key_id"],
            "computed": _fingerprint_origin(columns),
        },
        "plaintext_deleted": {
            "at": iso(columns["plaintext_deleted_at"]),
            "host": columns["plaintext_deleted_host"],
        },
        # Masked (PCI-paused) spans as checked against the audio before
        # encryption (null: no mask announced); see README "PCI masking".
        "pci_mask": None
        if rec.mask_verified is None
        else {
            "verified": rec.mask_verified,
            "spans": rec.mask_spans or [],
            "acknowledged_at": iso(rec.mask_ack_at),
            "acknowledged_by": rec.mask_ack_by,
        },
        "erased_at": iso(rec.erased_at),
        "events": events,
    }
    services.db.audit(
        action="custody",
        user_id=user_id,
        success=True,
        recording_id=rec.id,
        tenant_id=rec.tenant_id,
        details={"events": len(events)},
    )
    return doc


def _chunks(fileobj: IO[bytes]) -> Iterator[bytes]:
    while chunk := fileobj.read(CHECK_CHUNK):
        yield chunk


def check_copy(
    services: Services, recording_id: str, fileobj: IO[bytes], *, user_id: str
) -> dict[str, Any]:
    """Compare a file with the recording's stored keyed fingerprint; log the check.

    Raises ``FingerprintMismatch`` if it differs (after logging), and
    ``IntegrityError`` if the recording has no fingerprint to compare with.
    """
    rec: Recording = services.db.recording(recording_id)
    columns = services.db.custody_columns(rec.id)
    stored = columns["plaintext_hmac"]
    if not stored:
        raise IntegrityError(
            f"recording {rec.id} has no plaintext fingerprint (stored before fingerprints, "
            f"or status {rec.status})",
            hint="Compare with a copy decrypted by 'fsrecrypt get' instead.",
        )
    key = FingerprintKey.from_config(services.config, create=False)
    if columns["plaintext_hmac_key_id"] and key.key_id != columns["plaintext_hmac_key_id"]:
        raise IntegrityError(
            f"recording {rec.id} was fingerprinted with key {columns['plaintext_hmac_key_id']}, "
            f"the configured fingerprint key is {key.key_id}",
            hint="Point [audit] fingerprint_key_file at the key in use when it was stored.",
        )
    computed = key.fingerprint(rec.tenant_id, _chunks(fileobj))
    match = hmac.compare_digest(computed, stored)
    services.db.audit(
        action="custody_check",
        user_id=user_id,
        success=match,
        recording_id=rec.id,
        tenant_id=rec.tenant_id,
        details={"match": match},
    )
    if not match:
        raise FingerprintMismatch(f"the file does not match recording {rec.id}'s fingerprint")
    return {"recording_id": rec.id, "match": True, "key_id": key.key_id}


def _fingerprint_origin(columns: dict[str, Any]) -> str | None:
    if not columns["plaintext_hmac"]:
        return None
    if columns.get("plaintext_hmac_source") == "decrypted":
        return (
            f"from the authenticated decryption of the stored object at "
            f"{iso(columns['plaintext_hmac_at'])} (stored before fingerprints existed)"
        )
    return "over the bytes read while the recording was encrypted"


@dataclass
class FingerprintFill:
    """What ``custody --fill-missing`` did: fingerprinted, skipped (changed meanwhile), failed."""

    fingerprinted: int = 0
    skipped: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fill_missing_fingerprints(
    services: Services,
    *,
    tenant_name: str | None = None,
    user_id: str,
    limit: int | None = None,
    progress: ProgressCallback | None = None,
) -> FingerprintFill:
    """Fingerprint stored recordings that predate fingerprints, from their decrypted objects.

    Each object is decrypted and authenticated frame by frame (as ``verify``
    does) and its size checked against the row; only then is the HMAC
    written, once, with source ``decrypted`` and an audit row, so the
    custody document never presents it as computed while encrypting. A
    recording that fails is named and left without a fingerprint.
    """
    key = FingerprintKey.from_config(services.config, create=True)
    tenant_id = services.db.tenant_by_name(tenant_name).id if tenant_name else None
    result = FingerprintFill()
    after: str | None = None
    done = 0
    total = int(services.db.unfingerprinted(after_id=None, tenant_id=tenant_id, limit=None)[0])
    total = min(total, limit) if limit is not None else total
    if progress is not None:
        progress(0, total)
    while limit is None or done < limit:
        batch = services.db.unfingerprinted(
            after_id=after, tenant_id=tenant_id, limit=min(100, limit - done if limit else 100)
        )
        if not batch:
            break
        for recording_id in batch:
            after = recording_id
            done += 1
            try:
                _fingerprint_one(services, key, recording_id, user_id, result)
            except FsrecryptError as exc:
                result.failures[recording_id] = exc.message
            if progress is not None:
                progress(done, total)
    return result


def _fingerprint_one(
    services: Services, key: FingerprintKey, recording_id: str, user_id: str, result: Any
) -> None:
    rec = services.db.recording(recording_id)
    mac = key.hasher(rec.tenant_id)
    total = 0
    for chunk in iter_plaintext(services, open_recording(services, rec)):
        mac.update(chunk)
        total += len(chunk)
    if rec.file_size_bytes is not None and total != rec.file_size_bytes:
        raise IntegrityError(
            f"decrypted {total} bytes, the row says {rec.file_size_bytes}",
            hint="Run 'fsrecrypt verify --recording ID' and restore the object.",
        )
    fingerprint = str(mac.hexdigest())
    with services.db.transaction("recording a custody fingerprint") as cur:
        written = services.db.set_decrypted_fingerprint(
            cur, rec.id, fingerprint, key.key_id, rec.s3_path or ""
        )
        if written:
            services.db.audit_in_transaction(
                cur,
                action="custody_fingerprint",
                user_id=user_id,
                success=True,
                recording_id=rec.id,
                tenant_id=rec.tenant_id,
                details={"source": "decrypted", "key_id": key.key_id, "bytes": total},
            )
    if written:
        result.fingerprinted += 1
    else:
        result.skipped += 1
