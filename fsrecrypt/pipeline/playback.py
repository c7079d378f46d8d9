"""The way back, and where a Range request becomes frames: open, verify, decrypt one recording.

Reading trusts the database's copy of the wrapped data key (key rotation
re-wraps it there), checks that the object's encryption context names the
same tenant and recording as the row (an object swapped between tenants is
refused), and verifies every frame before its plaintext is released. A
Range is planned by ``fsrecrypt.format.plan_range`` and read with one ranged
request for just the frames that hold it (``iter_plaintext_range``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from fsrecrypt import format as esdk
from fsrecrypt.errors import (
    FsrecryptError,
    InvalidState,
    KeyAccessError,
    MalformedMessage,
    ObjectMismatch,
    RangeNotSatisfiable,
    RecordingGone,
)
from fsrecrypt.keys import DataKeyAuthenticationFailed
from fsrecrypt.pipeline.envelope import edk_from_bytes, encryption_context
from fsrecrypt.pipeline.headers import read_described_header
from fsrecrypt.pipeline.services import Services
from fsrecrypt.store.base import ObjectChanged

if TYPE_CHECKING:
    from fsrecrypt.db import Recording
    from fsrecrypt.store import ObjectInfo


class IterReader(io.RawIOBase):
    """A read-only file object over an iterator of byte chunks (a store's GET body).

    When the chunks come from a body that can fill a buffer itself (S3's,
    see ``readinto`` of ``_S3Body`` in ``fsrecrypt/store/s3.py``), reads go
    straight to it once no chunk is pending: the caller's buffer is filled
    from the socket's data in one copy, instead of a chunk being allocated
    and then copied again here.
    """

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._direct: Callable[[Any], int] | None = getattr(chunks, "readinto", None)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._direct is not None and not self._pending:
            return self._direct(buffer)
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


@dataclass
class OpenedRecording:
    """A stored recording ready to be read: header verified, content key derived."""

    recording: Recording
    header: esdk.Header
    content_key: bytes = field(repr=False)
    data_key: bytes = field(repr=False)
    object_size: int
    plaintext_size: int
    # The wrapping key that opened it (the primary, or an escrow key).
    opened_with: str = ""
    primary_error: str | None = None
    # The object as its header was read (reads are conditional on it staying so).
    info: ObjectInfo | None = None


def check_readable(recording: Recording) -> str:
    """The object key of a recording that can be read, or the typed reason it cannot."""
    if recording.status == "erased":
        raise RecordingGone(f"recording {recording.id} was erased")
    if recording.status != "stored" or not recording.s3_path:
        raise InvalidState(f"recording {recording.id} is {recording.status}, not stored")
    return recording.s3_path


def unwrap_data_key(services: Services, recording: Recording, header: esdk.Header) -> bytes:
    """The data key from the database's copy (see ``unwrap_data_key_from``)."""
    return unwrap_data_key_from(services, recording, header).data_key


@dataclass(frozen=True)
class Unwrapped:
    """A data key and the wrapping key that gave it up (for the audit row)."""

    data_key: bytes = field(repr=False)
    key_ref: str
    escrow: bool = False
    # Why the primary key did not open it, when an escrow key had to.
    primary_error: str | None = None


def unwrap_data_key_from(
    services: Services, recording: Recording, header: esdk.Header
) -> Unwrapped:
    """The data key from the database's copies, once the header is shown to be this recording's.

    The header's context must be exactly the row's (tenant and recording):
    an object swapped between recordings or tenants is refused before any
    key is used. Both that and a wrapped key that does not authenticate
    under the recording's own context are integrity failures
    (``ObjectMismatch``), not key outages: retrying cannot help, and they
    must be audited as tampering.

    The primary copy is tried first. When its key cannot be used (disabled,
    deleted, access denied, its region or KMS unreachable), the recording's
    escrow copies are tried in the tenant's order; if none opens, the
    primary's error is raised (a transient ``KeyProviderUnavailable`` stays
    transient). Which key opened it is returned for the audit row.
    """
    context = encryption_context(recording.tenant_id, recording.id)
    if dict(header.encryption_context) != context:
        raise ObjectMismatch(
            f"object {recording.s3_path} belongs to another recording or tenant",
            hint="The object was swapped or misfiled; treat it as tampered and do not play it.",
        )
    edk = edk_from_bytes(recording.encrypted_dek_bytes())
    try:
        return Unwrapped(
            services.keys.decrypt_data_key([edk], context), recording.kms_key_id or "primary"
        )
    except DataKeyAuthenticationFailed:
        raise _not_authentic(recording) from None
    except KeyAccessError as exc:
        primary_error = exc
    for ref, raw in services.db.escrow_deks(recording.id):
        try:
            data_key = services.escrow.unwrap(ref, edk_from_bytes(raw), context)
        except DataKeyAuthenticationFailed:
            raise _not_authentic(recording) from None
        except KeyAccessError:
            continue
        return Unwrapped(data_key, ref, True, primary_error.one_line()[:300])
    raise primary_error


def _not_authentic(recording: Recording) -> ObjectMismatch:
    return ObjectMismatch(
        f"the wrapped data key of recording {recording.id} does not authenticate "
        "under its tenant/recording context"
    )


def checked_plaintext_size(recording: Recording, header: esdk.Header, object_size: int) -> int:
    """The audio size the object holds, which must be the size the row recorded."""
    size = esdk.plaintext_size(header, object_size)
    if recording.file_size_bytes is not None and size != recording.file_size_bytes:
        raise MalformedMessage(
            f"object {recording.s3_path} holds {size} bytes of audio, the row says "
            f"{recording.file_size_bytes}"
        )
    return size


def open_recording(services: Services, recording: Recording) -> OpenedRecording:
    """Unwrap the data key (database copy) and verify the object's header against the row.

    A header cached for the object (verified when it was read) is used
    without asking the store anything: the identity it was read under goes
    with the result, and ``iter_plaintext_range`` makes its read conditional
    on it, so a replaced object is noticed there (``ObjectChanged``). Without
    a cache entry the header is read together with the object's identity (one
    request on S3); it is cached only once it verified. Any failure drops the
    cache entry.
    """
    key = check_readable(recording)
    cached = services.headers.get(key)
    try:
        if cached is not None:
            info, header = cached
        else:
            header, info = read_described_header(services.store, key)
        unwrapped = unwrap_data_key_from(services, recording, header)
        data_key = unwrapped.data_key
        content_key = esdk.verify_header(header, data_key)
        size = checked_plaintext_size(recording, header, info.size)
    except FsrecryptError:
        services.headers.drop(key)
        raise
    if cached is None:
        services.headers.put(key, info, header)
    return OpenedRecording(
        recording,
        header,
        content_key,
        data_key,
        info.size,
        size,
        unwrapped.key_ref,
        unwrapped.primary_error,
        info,
    )


def _dropping_on_failure(services: Services, key: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks``, forgetting ``key``'s cached header if reading the object fails."""
    try:
        yield from chunks
    except RangeNotSatisfiable:
        raise
    except FsrecryptError:
        services.headers.drop(key)
        raise


def iter_plaintext(services: Services, opened: OpenedRecording) -> Iterator[bytes]:
    """The whole recording, each frame released only after it authenticates."""
    key = opened.recording.s3_path or ""
    chunks = services.store.get_range(key, 0, None)
    reader = io.BufferedReader(IterReader(chunks), buffer_size=1 << 20)
    return _dropping_on_failure(
        services, key, esdk.decrypt_stream(reader, lambda _header: opened.data_key)
    )


def iter_plaintext_range(
    services: Services, opened: OpenedRecording, start: int, end: int | None
) -> tuple[esdk.RangePlan, Iterator[bytes]]:
    """Plaintext [start, end) from one ranged read of just the frames that hold it."""
    key = opened.recording.s3_path or ""
    plan = esdk.plan_range(opened.header, opened.object_size, start, end)
    try:
        chunks = services.store.get_range(
            key, plan.ciphertext_start, plan.ciphertext_end, expect=opened.info
        )
    except FsrecryptError:
        services.headers.drop(key)
        raise
    return plan, _dropping_on_failure(
        services,
        key,
        esdk.decrypt_range(opened.header, opened.content_key, plan, chunks, opened.object_size),
    )


def open_range(
    services: Services, recording: Recording, start: int, end: int | None
) -> tuple[OpenedRecording, esdk.RangePlan, Iterator[bytes]]:
    """``open_recording`` then ``iter_plaintext_range``: one request per seek while the
    object's header is cached, and a fresh open (HEAD, header) when the object turns
    out to have been replaced since it was cached."""
    opened = open_recording(services, recording)
    try:
        plan, chunks = iter_plaintext_range(services, opened, start, end)
    except ObjectChanged:
        opened = open_recording(services, recording)  # the entry was dropped: read afresh
        plan, chunks = iter_plaintext_range(services, opened, start, end)
    return opened, plan, chunks


def fetch_recording(
    services: Services,
    recording_id: str,
    out: IO[bytes],
    *,
    user_id: str,
    action: str = "download",
    ip_address: str | None = None,
    user_agent: str | None = None,
) -> OpenedRecording:
    """Decrypt a recording into ``out``; every attempt, failed or not, is audit-logged."""
    started = time.monotonic()
    recording = None
    try:
        recording = services.db.recording(recording_id)
        opened = open_recording(services, recording)
        written = 0
        for chunk in iter_plaintext(services, opened):
            out.write(chunk)
            written += len(chunk)
    except FsrecryptError as exc:
        services.db.audit(
            action=action,
            user_id=user_id,
            success=False,
            recording_id=recording.id if recording else None,
            tenant_id=recording.tenant_id if recording else None,
            ip_address=ip_address,
            user_agent=user_agent,
            decryption_duration_ms=(time.monotonic() - started) * 1000,
            error_message=f"{type(exc).__name__}: {exc.message}",
        )
        raise
    services.db.audit(
        action=action,
        user_id=user_id,
        success=True,
        recording_id=recording.id,
        tenant_id=recording.tenant_id,
        ip_address=ip_address,
        user_agent=user_agent,
        decryption_duration_ms=(time.monotonic() - started) * 1000,
        details={"bytes": written, **opened_details(opened)},
    )
    return opened


def opened_details(opened: OpenedRecording | Unwrapped) -> dict[str, Any]:
    """What an audit row says about the key that opened a recording."""
    if isinstance(opened, Unwrapped):
        return {
            "wrapping_key": opened.key_ref,
            "escrow": opened.escrow,
            **({"primary_error": opened.primary_error} if opened.escrow else {}),
        }
    escrow = opened.primary_error is not None
    return {
        "wrapping_key": opened.opened_with,
        "escrow": escrow,
        **({"primary_error": opened.primary_error} if escrow else {}),
    }
