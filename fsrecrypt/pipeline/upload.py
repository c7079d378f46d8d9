"""Where an uploaded body becomes a stored row: the daemon's order, over a stream instead of a file.

The same steps as :mod:`fsrecrypt.pipeline.ingest`, in the same order: a
``pending`` row (claimed by this request), a fresh data key, the body
encrypted frame by frame straight into the store while the keyed custody
fingerprint is computed, then the ``stored`` row and its ``encrypt`` audit
row in one transaction. The plaintext exists only in the request's buffers
(one frame at a time): it is never whole in memory and never on disk.

What differs is what happens on failure. A file on disk can be retried; an
upload cannot (the bytes are gone), so anything that stops an upload before
its row is stored (a truncated body, a client that disconnects, a body over
the size limit, a WAV whose header does not match its length, a store
outage) removes the object it may have written and moves the row to
``discarded`` with a failed audit row: the upload stored nothing, and the
client's retry (with the same ``Idempotency-Key``) starts afresh.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fsrecrypt.errors import FsrecryptError
from fsrecrypt.pipeline.custody import FingerprintingReader
from fsrecrypt.pipeline.ingest import begin_encryption, object_metadata, record_stored
from fsrecrypt.pipeline.playback import IterReader
from fsrecrypt.pipeline.services import Services, worker_id
from fsrecrypt.store import object_key

if TYPE_CHECKING:
    from fsrecrypt.db import Recording

UPLOAD_ORIGIN = "upload"


@dataclass(frozen=True)
class UploadRequest:
    """Who uploads what: the row's fields and the audit row's.

    ``audit`` holds the audit columns of the request (``ip_address``,
    ``user_agent``) and ``details`` what else the audit row names (the API
    key id, how the caller authenticated).
    """

    tenant_id: str
    call_uuid: str
    user_id: str
    idempotency_key: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    audit: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadOutcome:
    """The upload's row; ``replayed``: the row of an earlier upload with the same key."""

    recording: Recording
    replayed: bool
    plaintext_bytes: int = 0
    ciphertext_bytes: int = 0
    encrypt_seconds: float = 0.0


def store_upload(
    services: Services,
    request: UploadRequest,
    chunks: Iterable[bytes],
    *,
    lease_seconds: float,
    check: Callable[[int], Mapping[str, Any]] | None = None,
) -> UploadOutcome:
    """Encrypt ``chunks`` into the store as one new recording of the tenant (see module doc).

    ``check(plaintext_length)`` runs once the whole body went through and
    before the row is stored: whatever it raises discards the upload (the
    caller checks there that a WAV is complete and that the request ended
    as it should); what it returns joins the row's metadata (the WAV's
    format facts). A failure of any kind, ``BaseException`` included (a
    request deadline, a killed greenlet), discards the upload and is
    re-raised.
    """
    worker = worker_id()
    recording, created = services.db.create_upload(
        tenant_id=request.tenant_id,
        call_uuid=request.call_uuid,
        metadata={"origin": UPLOAD_ORIGIN, **request.metadata},
        worker=worker,
        lease_seconds=lease_seconds,
        idempotency_key=request.idempotency_key,
    )
    if not created:
        return UploadOutcome(recording, replayed=True)
    try:
        return _store(services, request, recording, chunks, worker, check)
    except BaseException as exc:
        error = exc.one_line() if isinstance(exc, FsrecryptError) else type(exc).__name__
        with contextlib.suppress(FsrecryptError):
            services.db.discard_upload(
                recording.id,
                worker,
                f"upload stored nothing: {error}",
                {
                    "action": "encrypt",
                    "user_id": request.user_id,
                    **request.audit,
                    "details": {"origin": UPLOAD_ORIGIN, "worker": worker, **request.details},
                },
            )
        raise


def _store(
    services: Services,
    request: UploadRequest,
    recording: Recording,
    chunks: Iterable[bytes],
    worker: str,
    check: Callable[[int], Mapping[str, Any]] | None,
) -> UploadOutcome:
    config = services.config
    tenant = services.db.tenant_by_id(request.tenant_id)
    started = time.monotonic()
    sealing = begin_encryption(services, tenant, recording.id)
    encryptor = sealing.encryptor
    key = object_key(
        config.storage.prefix,
        tenant.id,
        f"{recording.id}.{secrets.token_hex(4)}",
        recording.created_at,
    )
    plaintext = FingerprintingReader(IterReader(chunks), services.fingerprint_key.hasher(tenant.id))  # type: ignore[arg-type]
    info = services.store.put_stream(
        key,
        encryptor.stream(plaintext),  # type: ignore[arg-type]
        metadata={"fsrecrypt-recording-id": recording.id, "fsrecrypt-tenant-id": tenant.id},
    )
    try:
        facts = dict(check(encryptor.plaintext_length)) if check is not None else {}
        elapsed = time.monotonic() - started
        missing = {"escrow_missing": sealing.escrow_missing} if sealing.escrow_missing else {}
        metadata = object_metadata(services, encryptor, info, **missing, **facts)
        stored = record_stored(
            services,
            recording.id,
            sealing,
            key,
            info,
            plaintext_mac=plaintext.mac.hexdigest(),
            metadata=metadata,
            worker=worker,
            user_id=request.user_id,
            elapsed=elapsed,
            audit_details={"origin": UPLOAD_ORIGIN, **request.details},
            audit_fields=request.audit,
        )
    except BaseException:
        # Nothing refers to the object: remove it (best effort; under S3 Object
        # Lock the storage keeps it, encrypted and unreferenced, until retention ends).
        with contextlib.suppress(FsrecryptError):
            services.store.delete(key)
        raise
    return UploadOutcome(
        stored,
        replayed=False,
        plaintext_bytes=encryptor.plaintext_length,
        ciphertext_bytes=encryptor.ciphertext_length,
        encrypt_seconds=elapsed,
    )
