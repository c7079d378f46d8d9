"""Where a RECORD_STOP becomes a stored row: one recording's job, from plaintext to object.

Storing follows one order, and the order is the safety argument: a
``pending`` row first (so a crash leaves a trace the sweep will resume), then
encrypt + upload under a fresh data key, then the ``stored`` row and its
audit row in one transaction, and only then the plaintext is deleted. Every
step before the last can fail and be retried without losing audio; the
plaintext disappears only once the object and its row are durable.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsrecrypt import format as esdk
from fsrecrypt.errors import (
    FsrecryptError,
    InvalidState,
    KeyAccessError,
    SourceChanged,
    SourceIncomplete,
)
from fsrecrypt.pipeline.custody import FingerprintingReader
from fsrecrypt.pipeline.envelope import ALGORITHM_NAME, edk_to_bytes, encryption_context
from fsrecrypt.pipeline.masks import plan_mask_check
from fsrecrypt.pipeline.services import Services, worker_id
from fsrecrypt.plaintext import (
    HEAD_BYTES,
    SourceFile,
    content_changed,
    delete_plaintext,
    open_source,
    wav_info,
)
from fsrecrypt.store import ObjectAccessDenied, ObjectInfo, object_key

if TYPE_CHECKING:
    from fsrecrypt.db import Recording, Tenant
    from fsrecrypt.keys import DataKey


@dataclass(frozen=True)
class StoreOutcome:
    recording: Recording
    object_key: str
    plaintext_bytes: int
    ciphertext_bytes: int
    encrypt_seconds: float
    plaintext_deleted: bool
    already_stored: bool = False
    # The plaintext was kept because it changed after it was opened: it holds
    # bytes that were not stored, and must be stored again (the daemon re-queues it).
    source_changed: bool = False
    # The keyed fingerprint of the bytes encrypted (None when already stored):
    # what a read-back of the object must reproduce (backfill checks it).
    plaintext_hmac: str | None = None
    # Why the announced mask is not verified (None: verified, or no mask).
    mask_reason: str | None = None


def object_metadata(
    services: Services, encryptor: esdk.Encryptor, info: Any, **extra: Any
) -> dict[str, Any]:
    """What the row keeps about its object (format, store, key provider, version).

    One place for the daemon's, the backfill's and the upload's rows, so a
    recording reads the same whichever way it arrived.
    """
    metadata: dict[str, Any] = {
        "message_id": encryptor.header.message_id.hex(),
        "frame_length": services.config.pipeline.frame_size,
        "suite": f"0x{esdk.SUITE_ID:04X}",
        "header_size": encryptor.header.size,
        "store": services.store.name,
        "key_provider": services.keys.name,
        **extra,
    }
    if info.version_id:
        metadata["object_version"] = info.version_id
    return metadata


def register_source(
    services: Services,
    source: SourceFile,
    tenant: Tenant,
    *,
    call_uuid: str | None = None,
    core_uuid: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[Recording, bool]:
    """Insert (or find) the pending row for an opened source file."""
    return services.db.create_pending(
        tenant_id=tenant.id,
        source_path=source.path,
        source_fingerprint=source.fingerprint,
        call_uuid=call_uuid,
        core_uuid=core_uuid,
        metadata=metadata,
    )


def store_recording(
    services: Services,
    recording: Recording,
    source: SourceFile,
    tenant: Tenant,
    *,
    worker: str,
    user_id: str = "fsrecrypt",
    delete: bool | None = None,
    lease_seconds: float = 600.0,
    on_chunk: Callable[[int], None] | None = None,
    claimed: Recording | None = None,
    changed: Callable[[SourceFile], str | None] = content_changed,
    audit_details: Mapping[str, Any] | None = None,
) -> StoreOutcome:
    """Encrypt one claimed recording into the store, mark it stored, then drop the plaintext.

    ``claimed``: the row as returned by a claim this ``worker`` already holds
    (the daemon claims and reads the tenant in one statement); the claim is
    then not taken a second time. Anything else is claimed here.
    ``changed``: why the source is no longer what was read (None if it is);
    a file's descriptor by default, a pinned object version for a backfill
    from S3. ``audit_details``: added to the ``encrypt`` audit row's details
    (a backfill names its origin there).
    """
    config = services.config
    delete = config.pipeline.delete_plaintext if delete is None else delete
    if recording.status == "stored":
        deleted = (
            delete
            and _object_stored(services, recording.s3_path or "")
            and delete_plaintext(source)
        )
        return StoreOutcome(recording, recording.s3_path or "", 0, 0, 0.0, deleted, True)
    if recording.status not in ("pending", "failed"):
        raise InvalidState(f"recording {recording.id} is {recording.status}; nothing to store")
    if source.wav_state == "incomplete":
        # Stored now, the recording would be cut short and the rest of the audio
        # deleted with the plaintext: wait for the recorder to finish it.
        raise SourceIncomplete(
            f"{source.path} is a WAV still being written (its header sizes do not match "
            f"its {source.size} bytes yet)"
        )
    if claimed is None or claimed.id != recording.id or claimed.claimed_by != worker:
        claimed = services.db.claim(recording.id, worker, lease_seconds)
    if claimed is None:
        raise InvalidState(
            f"recording {recording.id} is being stored by another worker",
            hint="Nothing to do: the other worker will finish it (or its lease will expire).",
        )
    if source.fingerprint != claimed.source_fingerprint:
        claimed = _repoint_grown(services, claimed, source)

    started = time.monotonic()
    sealing = begin_encryption(services, tenant, recording.id)
    escrow_missing, encryptor = sealing.escrow_missing, sealing.encryptor
    # A per-attempt suffix: a zombie worker whose lease expired can never
    # overwrite the object a later attempt stored and recorded.
    key = object_key(
        config.storage.prefix,
        tenant.id,
        f"{recording.id}.{secrets.token_hex(4)}",
        recording.created_at,
    )
    source.fileobj.seek(0)
    head = source.fileobj.read(HEAD_BYTES)
    source.fileobj.seek(0)

    def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if on_chunk is not None:
                on_chunk(len(chunk))
            yield chunk

    mask_check = plan_mask_check(services, recording)
    stream = source.fileobj if mask_check is None else mask_check.wrap(source.fileobj)
    plaintext = FingerprintingReader(stream, services.fingerprint_key.hasher(tenant.id))
    info = services.store.put_stream(
        key,
        counted(encryptor.stream(plaintext)),  # type: ignore[arg-type]
        metadata={"fsrecrypt-recording-id": recording.id, "fsrecrypt-tenant-id": tenant.id},
    )
    elapsed = time.monotonic() - started
    why_changed = (
        f"{source.size} bytes at open, {encryptor.plaintext_length} read"
        if encryptor.plaintext_length != source.size
        else changed(source)
    )
    if why_changed is not None:
        # What was read is not the file as it is now: never mark it stored.
        # Removing the object is best effort: under S3 Object Lock the storage
        # keeps it until its retention ends (it is encrypted and unreferenced),
        # and the caller must still learn that the source changed.
        with contextlib.suppress(FsrecryptError):
            services.store.delete(key)
        raise SourceChanged(f"{source.path} changed while it was read ({why_changed})")
    metadata = object_metadata(
        services,
        encryptor,
        info,
        **({"escrow_missing": escrow_missing} if escrow_missing else {}),
        **({"wav": wav_info(head, source.size)} if head[:4] == b"RIFF" else {}),
    )
    mask = mask_check.result() if mask_check is not None else None
    details: dict[str, Any] = {}
    if mask is not None and mask[2] is not None:
        # In the hash-chained encrypt row (and so in `audit export`): the
        # verdict and the spans (the first 200; all are on the recording).
        spans = mask[1] or []
        details["mask"] = {"verified": mask[2], "span_count": len(spans), "spans": spans[:200]}
    try:
        stored = record_stored(
            services,
            recording.id,
            sealing,
            key,
            info,
            plaintext_mac=plaintext.mac.hexdigest(),
            metadata=metadata,
            worker=worker,
            user_id=user_id,
            elapsed=elapsed,
            audit_details={**(audit_details or {}), **details},
            mask=mask,
        )
    except InvalidState:
        # Someone else owns the row now; our object is an orphan: remove it.
        with contextlib.suppress(FsrecryptError):
            services.store.delete(key)
        raise
    deleted = bool(delete) and delete_plaintext(source)
    if deleted:
        # Evidence only: the recording is stored and its plaintext gone either way.
        with contextlib.suppress(FsrecryptError):
            services.db.note_plaintext_deleted(recording.id, socket.gethostname())
    return StoreOutcome(
        stored,
        key,
        encryptor.plaintext_length,
        encryptor.ciphertext_length,
        elapsed,
        deleted,
        source_changed=bool(delete) and not deleted and changed(source) is not None,
        plaintext_hmac=plaintext.mac.hexdigest(),
        mask_reason=mask_check.reason if mask_check is not None else None,
    )


def record_stored(
    services: Services,
    recording_id: str,
    sealing: Sealing,
    key: str,
    info: ObjectInfo,
    *,
    plaintext_mac: str,
    metadata: Mapping[str, Any],
    worker: str,
    user_id: str,
    elapsed: float,
    audit_details: Mapping[str, Any],
    audit_fields: Mapping[str, Any] | None = None,
    mask: tuple[int, list[dict[str, Any]] | None, bool | None] | None = None,
) -> Recording:
    """The ``stored`` row of a just-uploaded object and its ``encrypt`` audit row, in one
    transaction; the same columns whichever way the recording arrived (daemon, backfill,
    upload). ``audit_details`` go into the row's details after the object's own;
    ``audit_fields``: more audit columns (an upload's client address)."""
    encryptor = sealing.encryptor
    return services.db.mark_stored(
        recording_id,
        encryption_algorithm=ALGORITHM_NAME,
        encrypted_dek=edk_to_bytes(sealing.data_key.encrypted),
        kms_key_id=sealing.data_key.key_id,
        s3_path=key,
        file_size_bytes=encryptor.plaintext_length,
        encrypted_size_bytes=encryptor.ciphertext_length,
        metadata=metadata,
        claimed_by=worker,
        plaintext_hmac=(plaintext_mac, services.fingerprint_key.key_id),
        escrow_deks=sealing.escrow_deks(),
        audit={
            "action": "encrypt",
            "user_id": user_id,
            "success": True,
            "decryption_duration_ms": elapsed * 1000,
            **(audit_fields or {}),
            "details": {
                "object_key": key,
                "object_version": info.version_id,
                "bytes": encryptor.plaintext_length,
                "worker": worker,
                **audit_details,
            },
        },
        mask=mask,
    )


@dataclass(frozen=True)
class Sealing:
    """A new recording's data key, its escrow copies and the encryptor holding them all."""

    data_key: DataKey
    escrow: list[tuple[str, esdk.EncryptedDataKey]]
    escrow_missing: dict[str, str]
    encryptor: esdk.Encryptor

    def escrow_deks(self) -> list[tuple[str, bytes]]:
        """The escrow copies as the database keeps them (``mark_stored(escrow_deks=...)``)."""
        return [(ref, edk_to_bytes(edk)) for ref, edk in self.escrow]


def begin_encryption(services: Services, tenant: Tenant, recording_id: str) -> Sealing:
    """A fresh data key for one recording, wrapped by the tenant's key and each escrow key.

    The one start of every encryption (daemon, backfill, upload), so every
    object's header carries the same EDKs whichever way it arrived.
    """
    context = encryption_context(tenant.id, recording_id)
    data_key = services.keys.generate_data_key(tenant.kms_key_id, context)
    escrow, missing = _escrow_copies(services, tenant, data_key.plaintext, context)
    encryptor = esdk.Encryptor(
        data_key.plaintext,
        [data_key.encrypted, *(edk for _ref, edk in escrow)],
        context,
        frame_length=services.config.pipeline.frame_size,
    )
    return Sealing(data_key, escrow, missing, encryptor)


def _escrow_copies(
    services: Services, tenant: Tenant, data_key: bytes, context: dict[str, str]
) -> tuple[list[tuple[str, esdk.EncryptedDataKey]], dict[str, str]]:
    """One more EDK per escrow key, after the primary's (header and database alike).

    An escrow key that cannot wrap right now (its region down, disabled,
    access denied) does not stop the recording: it is stored with the
    other keys, the row names what is missing (``escrow_missing``), ``verify
    --escrow`` reports it and ``tenants set-keys`` (run again) adds the
    database copy. A second way in must not become a second way to fail.
    """
    copies: list[tuple[str, esdk.EncryptedDataKey]] = []
    missing: dict[str, str] = {}
    for ref in tenant.escrow_key_ids:
        try:
            copies.append((ref, services.escrow.wrap(ref, data_key, context)))
        except KeyAccessError as exc:
            missing[ref] = exc.one_line()[:300]
    return copies, missing


def _object_stored(services: Services, key: str) -> bool:
    """Does the stored row's object exist, before its plaintext goes?

    A role that may write but not read objects (HeadObject needs
    s3:GetObject, which the daemon's does not have: conf/iam/daemon.json)
    cannot look; the row itself is then the proof, as it became ``stored``
    only after the upload returned.
    """
    try:
        return services.store.exists(key)
    except ObjectAccessDenied:
        return True


def _repoint_grown(services: Services, claimed: Recording, source: SourceFile) -> Recording:
    """The claimed row, moved to the opened file's fingerprint if it is the same file grown.

    A row registered when its RECORD_STOP arrived names the file as it was
    then; if the WAV was still being written, the same inode is now larger.
    Any other difference (another inode at the path) is a different file.
    """
    old = claimed.source_fingerprint.split(":")
    same_file = old[:2] == [str(source.device), str(source.inode)]
    moved = (
        services.db.repoint_source(claimed.id, claimed.source_fingerprint, source.fingerprint)
        if same_file
        else None
    )
    if moved is None:
        raise InvalidState(f"recording {claimed.id}: the file on disk is not the one registered")
    return moved


def ingest_file(
    services: Services,
    path: str,
    tenant_name: str,
    *,
    call_uuid: str | None = None,
    user_id: str = "cli",
    allowed_dirs: Sequence[str] | None = None,
    delete: bool | None = None,
) -> StoreOutcome:
    """The whole pipeline for one file, as ``fsrecrypt ingest`` runs it (one attempt)."""
    tenant = services.db.tenant_by_name(tenant_name)
    source = open_source(path, allowed_dirs)
    try:
        recording, _created = register_source(services, source, tenant, call_uuid=call_uuid)
        worker = worker_id()
        try:
            return store_recording(
                services, recording, source, tenant, worker=worker, user_id=user_id, delete=delete
            )
        except FsrecryptError as exc:
            if not isinstance(exc, InvalidState):
                final = (
                    not exc.transient
                    or recording.attempts + 1 >= services.config.pipeline.max_attempts
                )
                services.db.record_attempt_failure(
                    recording.id, exc.one_line(), final=final, user_id=user_id
                )
            raise
    finally:
        source.fileobj.close()
