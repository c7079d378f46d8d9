"""One backfill item: a listed file or object becomes a stored recording, then the source goes.

The order is the daemon's (``pipeline/ingest.py``), with one step added
before anything is removed:

1. open the source pinned to what was listed (a file's identity, an
   object's version and ETag); anything else is reported, not stored;
2. check it is audio (a WAV must be complete; mp3/ogg/opus/flac are stored
   as they are, with their content type);
3. register the ``pending`` row: ``(source, identity)`` is unique, so a
   re-run after a kill finds the row instead of storing the audio twice
   (and a copy of audio already stored for the same call, from another
   source, is found by its keyed fingerprint and not stored again);
4. ``store_recording``: the same object format, tenant key, ``stored`` row
   and ``encrypt`` audit row (``origin: backfill``), custody fingerprint;
5. read the stored object back, decrypt it and compare its keyed fingerprint
   and size with the row: only a verified object lets the source go;
6. remove the source (``--keep-source``: never): a file by name only if it
   is still the very file stored; an object's versions only while its
   current version is still the content stored.

Every step is safe to repeat, so killing the process at any instant and
running the item again stores nothing twice and removes nothing unstored.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from fsrecrypt import format as esdk
from fsrecrypt.backfill.naming import media_type
from fsrecrypt.backfill.sources import S3Options, SourceItem, SourceObjectChanged
from fsrecrypt.db import Recording, Tenant
from fsrecrypt.errors import (
    FormatError,
    FsrecryptError,
    InputFileError,
    IntegrityError,
    InvalidState,
    PathRefused,
    UnknownTenant,
)
from fsrecrypt.pipeline import (
    IterReader,
    Services,
    check_readable,
    register_source,
    unwrap_data_key,
)
from fsrecrypt.pipeline.custody import FingerprintKey
from fsrecrypt.pipeline.ingest import store_recording
from fsrecrypt.plaintext import (
    HEAD_BYTES,
    SourceFile,
    content_changed,
    delete_plaintext,
    open_source,
)
from fsrecrypt.store import object_key

ORIGIN = "backfill"
DEFAULT_LEASE = 45.0
"""Seconds a worker holds a recording it stores: a killed worker's rows are free again soon."""


class RecordingBusy(FsrecryptError):
    """Another worker holds the recording right now (or took it over): try again later."""

    hint = "It is retried; the other worker's lease ends within a minute if it died."
    transient = True


class ReadBackFailed(IntegrityError):
    """The stored object did not decrypt to the bytes read: the source was kept."""

    hint = "The source is kept; check the store ('fsrecrypt verify') and run the backfill again."


@dataclass(frozen=True)
class ItemOutcome:
    """What happened to one item. ``status``: stored, already-stored, skipped, changed,
    would-store (dry run)."""

    source: str
    status: str
    reason: str | None = None
    recording_id: str | None = None
    tenant: str | None = None
    call_uuid: str | None = None
    content_type: str | None = None
    bytes: int = 0
    source_removed: bool = False
    versions_removed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False, 0)}


@dataclass
class ItemWorker:
    """Works items for one process: the services, the options, and what it caches."""

    services: Services
    worker: str
    user_id: str = "backfill"
    keep_source: bool = False
    dry_run: bool = False
    s3: S3Options = field(default_factory=S3Options)
    lease_seconds: float = DEFAULT_LEASE
    _tenants: dict[str, Tenant] = field(default_factory=dict, repr=False)
    _buckets: dict[str, Any] = field(default_factory=dict, repr=False)
    _fingerprint: FingerprintKey | None = field(default=None, repr=False)

    def tenant(self, name: str) -> Tenant:
        if name not in self._tenants:
            self._tenants[name] = self.services.db.tenant_by_name(name)
        return self._tenants[name]

    def bucket(self, name: str) -> Any:
        if name not in self._buckets:
            from fsrecrypt.backfill.s3source import S3Source

            self._buckets[name] = S3Source(name, self.s3.endpoint_url, self.s3.region)
        return self._buckets[name]

    @property
    def fingerprint(self) -> FingerprintKey:
        if self._fingerprint is None:
            self._fingerprint = FingerprintKey.from_config(self.services.config)
        return self._fingerprint

    def run(self, item: SourceItem) -> ItemOutcome:
        """Work one item to its end (raises only what a retry may cure, or a bug)."""
        base = {"source": item.shown, "tenant": item.tenant, "call_uuid": item.call_uuid}
        if item.skip is not None or item.tenant is None:
            return ItemOutcome(status="skipped", reason=item.skip, **base)
        try:
            tenant = self.tenant(item.tenant)
        except UnknownTenant:
            reason = f"tenant {item.tenant!r} does not exist (add it, then run again)"
            return ItemOutcome(status="skipped", reason=reason, **base)
        try:
            source = self._open(item)
        except PathRefused as exc:
            return ItemOutcome(status="skipped", reason=exc.message, **base)
        except InputFileError as exc:  # gone, or changed since listed (S3: ETag/version)
            return self._gone(item, base, exc)
        try:
            return self._store(item, source, tenant, base)
        finally:
            source.fileobj.close()

    def _gone(self, item: SourceItem, base: dict[str, Any], exc: InputFileError) -> ItemOutcome:
        """The source cannot be opened as listed: removed by an earlier run of this item
        (killed before it recorded the outcome), or changed/removed by someone else."""
        if not isinstance(exc, SourceObjectChanged):
            path = item.locator if item.kind == "dir" else f"s3://{item.root}/{item.locator}"
            identity = item.identity if item.kind == "dir" else f"s3:{item.identity}:{item.size}"
            for rec in self.services.db.recordings(source_path=path, status=["stored"]):
                if rec.source_fingerprint == identity:
                    return ItemOutcome(
                        status="already-stored",
                        reason="its source was removed by an earlier run",
                        recording_id=rec.id,
                        **base,
                    )
        return ItemOutcome(status="changed", reason=exc.message, **base)

    def _open(self, item: SourceItem) -> SourceFile:
        if item.kind == "dir":
            return open_source(item.locator, [item.root])
        reader = self.bucket(item.root).open(
            item.locator, item.identity, item.version_id, HEAD_BYTES
        )
        return SourceFile(
            path=f"s3://{item.root}/{item.locator}",
            fileobj=reader,  # type: ignore[arg-type]
            size=item.size,
            fingerprint=f"s3:{item.identity}:{item.size}",
            device=0,
            inode=0,
            name=item.locator.rpartition("/")[2],
            head=reader.head,
        )

    def _store(
        self, item: SourceItem, source: SourceFile, tenant: Tenant, base: dict[str, Any]
    ) -> ItemOutcome:
        if item.kind == "dir" and source.fingerprint != item.identity:
            reason = "the file was replaced or modified since it was listed (kept)"
            return ItemOutcome(status="changed", reason=reason, **base)
        content_type, why = media_type(item.name, source.head)
        if content_type is None:
            return ItemOutcome(status="skipped", reason=why, **base)
        if content_type == "audio/wav" and source.wav_state != "complete":
            reason = "incomplete WAV (its header sizes do not match the file)"
            return ItemOutcome(status="skipped", reason=reason, **base)
        base = {**base, "content_type": content_type, "bytes": source.size}
        if self.dry_run:
            return ItemOutcome(status="would-store", **base)
        copy = self._stored_copy(item, source, tenant)
        if copy is not None:  # this call's very audio, stored from another source
            verify_read_back(self.services, self.fingerprint, copy, None)
            base = {**base, "recording_id": copy.id}
            reason = "the same audio is stored for this call (from another source)"
            if self.keep_source:
                return ItemOutcome(status="already-stored", reason=reason, **base)
            return self._remove(item, source, copy, "already-stored", {**base, "reason": reason})
        rec, created = register_source(
            self.services,
            source,
            tenant,
            call_uuid=item.call_uuid,
            metadata={"origin": ORIGIN, "content_type": content_type, "source_kind": item.kind},
        )
        if rec.status in ("erased", "discarded"):
            reason = f"recording {rec.id} of this very source was {rec.status} (source kept)"
            return ItemOutcome(status="skipped", reason=reason, recording_id=rec.id, **base)
        for attempt in (1, 2):
            try:
                outcome = store_recording(
                    self.services,
                    rec,
                    source,
                    tenant,
                    worker=self.worker,
                    user_id=self.user_id,
                    delete=False,
                    lease_seconds=self.lease_seconds,
                    changed=_pinned if item.kind == "s3" else content_changed,
                    audit_details={"origin": ORIGIN, "source_kind": item.kind},
                )
                break
            except InvalidState as exc:
                if attempt == 2 or not self._release_dead_holder(rec.id):
                    raise RecordingBusy(f"{item.shown}: {exc.message}") from None
                rec = self.services.db.recording(rec.id)
        stored = outcome.recording
        verify_read_back(self.services, self.fingerprint, stored, outcome.plaintext_hmac)
        if not created:
            self._drop_orphans(stored)
        base = {**base, "recording_id": stored.id}
        status = "already-stored" if outcome.already_stored else "stored"
        if self.keep_source:
            return ItemOutcome(status=status, **base)
        return self._remove(item, source, stored, status, base)

    def _stored_copy(
        self, item: SourceItem, source: SourceFile, tenant: Tenant
    ) -> Recording | None:
        """A stored recording of the same tenant and call holding exactly this audio.

        Why: an archive often holds a copy of what the daemon already stored
        (a file copied aside, an S3 export of the recordings directory). The
        source identity differs, the audio does not; storing it again would
        store the call twice. Only when a stored row of this call has the
        source's size is the source read an extra time for its keyed
        fingerprint (a file through its descriptor, an object by a second
        pinned GET).
        """
        if item.call_uuid is None:
            return None
        candidates = [
            rec
            for rec in self.services.db.recordings(
                tenant_id=tenant.id, call_uuid=item.call_uuid, status=["stored"]
            )
            if rec.file_size_bytes == source.size
            and (rec.source_path, rec.source_fingerprint) != (source.path, source.fingerprint)
        ]
        if not candidates:
            return None
        mac = self.fingerprint.hasher(tenant.id)
        if item.kind == "dir":
            fd, offset = source.fileobj.fileno(), 0
            while chunk := os.pread(fd, 1 << 20, offset):
                mac.update(chunk)
                offset += len(chunk)
        else:
            reader = self.bucket(item.root).open(
                item.locator, item.identity, item.version_id, HEAD_BYTES
            )
            try:
                while chunk := reader.read(1 << 20):
                    mac.update(chunk)
            finally:
                reader.close()
        digest = mac.hexdigest()
        for rec in candidates:
            columns = self.services.db.custody_columns(rec.id)
            if columns["plaintext_hmac_key_id"] == self.fingerprint.key_id and hmac.compare_digest(
                columns["plaintext_hmac"] or "", digest
            ):
                return rec
        return None

    def _release_dead_holder(self, recording_id: str) -> bool:
        """Free a recording claimed by a process of this host that no longer exists.

        A backfill killed mid-item leaves its claim until the lease ends; the
        same host can tell its dead processes (``host:pid:nonce``) at once.
        """
        holder = self.services.db.recording(recording_id).claimed_by or ""
        if not dead_local_process(holder):
            return False
        host, _, rest = holder.partition(":")
        return self.services.db.release_claims(f"{host}:{rest.partition(':')[0]}:") > 0

    def _drop_orphans(self, rec: Recording) -> None:
        """Objects an earlier, killed attempt uploaded for this row but never recorded."""
        prefix = (
            object_key(
                self.services.config.storage.prefix, rec.tenant_id, rec.id, rec.created_at
            ).removesuffix(".esdk")
            + "."
        )
        for key in list(self.services.store.list_keys(prefix)):
            if key != rec.s3_path:
                with contextlib.suppress(FsrecryptError):
                    self.services.store.delete(key)

    def _remove(
        self,
        item: SourceItem,
        source: SourceFile,
        rec: Recording,
        status: str,
        base: dict[str, Any],
    ) -> ItemOutcome:
        versions = 0
        if item.kind == "dir":
            if not delete_plaintext(source):
                reason = "stored, but the file changed after it was read (kept)"
                return ItemOutcome(status="changed", reason=reason, **base)
        else:
            try:
                versions = self.bucket(item.root).remove(
                    item.locator, item.identity, item.latest, item.versions
                )
            except SourceObjectChanged as exc:
                reason = f"stored, but {exc.message} (kept)"
                return ItemOutcome(status="changed", reason=reason, **base)
        if (rec.source_path, rec.source_fingerprint) == (source.path, source.fingerprint):
            # (a copy's row keeps its own source's history)
            with contextlib.suppress(FsrecryptError):
                self.services.db.note_plaintext_deleted(rec.id, socket.gethostname())
        return ItemOutcome(status=status, source_removed=True, versions_removed=versions, **base)


def verify_read_back(
    services: Services, fingerprint: FingerprintKey, rec: Recording, expected: str | None
) -> None:
    """Decrypt the stored object; its keyed fingerprint and size must be the row's.

    One GET of the whole object: the header must carry the row's own
    context, and the data key is unwrapped from the row's copy (so the row,
    not only the object, is proven readable), as playback does. Damage of
    any kind raises ``ReadBackFailed``; a store or key outage its own
    (transient) error.
    """
    if expected is None:
        expected = services.db.custody_columns(rec.id)["plaintext_hmac"]
    mac = fingerprint.hasher(rec.tenant_id)
    total = 0
    reader = io.BufferedReader(IterReader(services.store.get_range(check_readable(rec))), 1 << 20)
    frames = esdk.decrypt_stream(reader, lambda h: unwrap_data_key(services, rec, h))
    try:
        for chunk in frames:
            mac.update(chunk)
            total += len(chunk)
    except FormatError as exc:  # damaged, truncated, swapped: never a reason to retry
        raise ReadBackFailed(
            f"recording {rec.id}: the stored object does not decrypt ({exc.message})"
        ) from None
    if (
        total != rec.file_size_bytes
        or not expected
        or not hmac.compare_digest(mac.hexdigest(), expected)
    ):
        raise ReadBackFailed(
            f"recording {rec.id}: the stored object does not read back as the source "
            f"({total} bytes decrypted, {rec.file_size_bytes} stored)"
        )


def dead_local_process(holder: str) -> bool:
    """Is ``holder`` (``host:pid[:nonce]``, a worker id) a process of this host now gone?"""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _pinned(_source: SourceFile) -> str | None:
    """An object read by version and ETag cannot change under the reader."""
    return None
