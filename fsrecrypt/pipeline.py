"""One recording's job, and the way back: the heart shared by the CLI and the daemon.

Storing (``store_recording``) follows one order, and the order is the safety
argument: a ``pending`` row first (so a crash leaves a trace the sweep will
resume), then encrypt + upload under a fresh data key, then the ``stored`` row
and its audit row in one transaction, and only then the plaintext is deleted.
Every step before the last can fail and be retried without losing audio; the
plaintext disappears only once the object and its row are durable.

Reading (``fetch_recording`` / ``open_recording``) trusts the database's copy
of the wrapped data key (key rotation re-wraps it there), checks that the
object's encryption context names the same tenant and recording as the row
(an object swapped between tenants is refused), and verifies every frame
before its plaintext is released.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import os
import secrets
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fsrecrypt import format as esdk
from fsrecrypt.config import Config
from fsrecrypt.errors import (
    FsrecryptError,
    InputFileError,
    InvalidState,
    MalformedMessage,
    ObjectMismatch,
    PathRefused,
    RangeNotSatisfiable,
    RecordingGone,
    SourceChanged,
    SourceIncomplete,
    TruncatedMessage,
)

if TYPE_CHECKING:
    from fsrecrypt.db import Database, Recording, Tenant
    from fsrecrypt.keys import KeyProvider
    from fsrecrypt.store import ObjectInfo, ObjectStore

ALGORITHM_NAME = "AES_256_GCM_HKDF_SHA512_COMMIT_KEY"
OBJECT_SUFFIX = ".esdk"
HEADER_PROBE = 4096


# --- encrypted data keys as stored in the database -------------------------------------


def edk_to_bytes(edk: esdk.EncryptedDataKey) -> bytes:
    """The ESDK wire encoding of one encrypted data key (what the header holds)."""
    provider = edk.provider_id.encode("utf-8")
    return b"".join(
        struct.pack(">H", len(part)) + part
        for part in (provider, edk.provider_info, edk.ciphertext)
    )


def edk_from_bytes(data: bytes) -> esdk.EncryptedDataKey:
    parts, offset = [], 0
    for _ in range(3):
        if offset + 2 > len(data):
            raise MalformedMessage("stored encrypted data key is truncated")
        (length,) = struct.unpack_from(">H", data, offset)
        offset += 2
        if offset + length > len(data):
            raise MalformedMessage("stored encrypted data key is truncated")
        parts.append(bytes(data[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise MalformedMessage("stored encrypted data key has trailing bytes")
    return esdk.EncryptedDataKey(parts[0].decode("utf-8"), parts[1], parts[2])


# --- files -----------------------------------------------------------------------------
#
# Why every plaintext file is reached by a descriptor walk: whoever can write a
# recordings directory (FreeSWITCH's user or group) can swap one of its
# sub-directories for a symbolic link at any instant (renameat2 with
# RENAME_EXCHANGE, in a loop). Checking a path (lstat, realpath) and then using
# it by name is therefore a race: O_NOFOLLOW guards only the last component.
# So a path is never used by name below the configured directory: the
# directory is opened once, every component is opened relative to its
# parent's descriptor with O_NOFOLLOW, and the file is deleted by name
# relative to its parent's descriptor after checking that the name still
# points at the very inode that was stored.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = (
    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
)


class _PlaintextFile(io.FileIO):
    """The opened recording; closing it also closes its parent directory's descriptor.

    The parent's descriptor is what ``delete_plaintext`` unlinks through, so
    it lives exactly as long as the file object every caller already closes.
    """

    def __init__(self, fd: int, dir_fd: int) -> None:
        super().__init__(fd, "rb", closefd=True)
        self.dir_fd: int | None = dir_fd

    def close(self) -> None:
        try:
            super().close()
        finally:
            dir_fd, self.dir_fd = self.dir_fd, None
            if dir_fd is not None:
                os.close(dir_fd)


@dataclass(frozen=True)
class SourceFile:
    """An opened, vetted plaintext file: the descriptor is what we read and check.

    ``name`` is the last component, relative to the parent directory's
    descriptor held by ``fileobj``; ``size`` and ``mtime_ns`` are the file as
    it was opened, so a change before the plaintext is deleted can be seen.
    """

    path: str
    fileobj: IO[bytes]
    size: int
    fingerprint: str
    device: int
    inode: int
    name: str = ""
    mtime_ns: int = 0
    head: bytes = field(default=b"", repr=False)

    @property
    def dir_fd(self) -> int | None:
        return getattr(self.fileobj, "dir_fd", None)

    @property
    def wav_state(self) -> str:
        """``complete``, ``incomplete`` or ``not-wav`` (see :func:`wav_state`)."""
        return wav_state(self.head, self.size, self.name)

    def close(self) -> None:
        self.fileobj.close()


def fingerprint_of(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def is_inside(path: Path, roots: Sequence[str]) -> bool:
    for root in roots:
        try:
            path.relative_to(Path(root).resolve())
            return True
        except ValueError:
            continue
    return False


def _components(path: str) -> list[str]:
    """The components of an absolute path, refusing anything a walk must not meet.

    Refused: not a str, NUL, a name that is not valid UTF-8 (surrogate
    escapes: it cannot be recorded faithfully), a relative path, and any
    empty, '.' or '..' component (no normalisation: the name is taken as is).
    """
    if not isinstance(path, str):
        raise PathRefused("refusing a path that is not text")
    if "\0" in path:
        raise PathRefused(f"refusing {path!r}: the name contains a NUL byte")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise PathRefused(f"refusing {path!r}: the name is not valid UTF-8") from None
    if not path.startswith("/"):
        raise PathRefused(f"refusing {path!r}: not an absolute path")
    parts = path[1:].split("/")
    for part in parts:
        if part == "..":
            raise PathRefused(f"refusing {path!r}: path contains '..'")
        if part in ("", "."):
            raise PathRefused(f"refusing {path!r}: path contains an empty or '.' component")
    return parts


def _root_parts(root: str) -> list[str]:
    normalised = os.path.normpath(os.path.abspath(root))
    return [p for p in normalised.split("/") if p]


def _walk_dirs(start_fd: int, parts: Sequence[str], shown: str) -> int:
    """Open ``parts`` one below the other from ``start_fd`` (not closed); the last dir's fd.

    Each component is opened relative to its parent's descriptor with
    O_NOFOLLOW | O_DIRECTORY: a symbolic link or a non-directory anywhere on
    the way is refused, whatever is swapped in meanwhile.
    """
    fd = os.dup(start_fd)
    try:
        for part in parts:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                raise InputFileError(
                    f"{shown} does not exist", hint="It may have been removed already."
                ) from None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PathRefused(
                        f"refusing {shown}: a directory on its path is a symbolic link "
                        "or not a directory"
                    ) from None
                raise PathRefused(
                    f"refusing {shown}: cannot open a directory on its path ({exc.strerror})"
                ) from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_root(root: str) -> int:
    """A descriptor on a configured directory, resolved once (it is trusted configuration).

    The resolved name is itself walked from '/' with O_NOFOLLOW, so the
    descriptor is the directory realpath named, not something swapped in after.
    """
    resolved = os.path.realpath(root)
    top = os.open("/", _DIR_FLAGS)
    try:
        return _walk_dirs(top, [p for p in resolved.split("/") if p], root)
    finally:
        os.close(top)


def _parent_fd(path: str, allowed_dirs: Sequence[str] | None) -> tuple[int, str]:
    """Descriptor of ``path``'s parent, reached by the safe walk; and the last component.

    With ``allowed_dirs`` the walk starts at the configured directory the path
    names (as configured, or as it resolves); without, at '/', so no
    symbolic link is followed at all.
    """
    parts = _components(path)
    start: list[str] | None = None
    rest: list[str] = parts
    if allowed_dirs is None:
        start, root_fd = [], os.open("/", _DIR_FLAGS)
    else:
        root_fd = -1
        for root in allowed_dirs:
            for candidate in (_root_parts(root), _root_parts(os.path.realpath(root))):
                if len(parts) > len(candidate) and parts[: len(candidate)] == candidate:
                    start, rest = candidate, parts[len(candidate) :]
                    break
            if start is not None:
                try:
                    root_fd = _open_root(root)
                except InputFileError:
                    raise PathRefused(
                        f"refusing {path}: the recordings directory {root} is missing"
                    ) from None
                break
        if start is None:
            raise PathRefused(f"refusing {path}: outside the configured recordings directories")
        rest = parts[len(start) :]
    try:
        return _walk_dirs(root_fd, rest[:-1], path), rest[-1]
    finally:
        os.close(root_fd)


def open_source(path: str, allowed_dirs: Sequence[str] | None = None) -> SourceFile:
    """Open a recording for reading, refusing anything but a plain regular file.

    Why so strict: the path comes from an event, i.e. from the network, and
    the directory it names may be writable by another user. The walk opens
    every directory relative to its parent with O_NOFOLLOW (see the section
    comment), the file's type is checked before it is opened (no device or
    FIFO is ever opened blocking; O_NONBLOCK on top) and again on the
    descriptor we read. A file with more than one link is refused: it may be
    a hard link to a file outside the recordings directories.
    """
    dir_fd, name = _parent_fd(path, allowed_dirs)
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise InputFileError(
                f"{path} does not exist", hint="It may have been removed already."
            ) from None
        except OSError as exc:
            raise InputFileError(f"cannot stat {path}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise PathRefused(f"refusing {path}: it is a symbolic link")
        if not stat.S_ISREG(st.st_mode):
            raise PathRefused(f"refusing {path}: not a regular file")
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise PathRefused(f"refusing {path}: cannot open it safely ({exc.strerror})") from None
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (
                st.st_dev,
                st.st_ino,
            ):
                raise PathRefused(f"refusing {path}: the file changed while it was being opened")
            if fst.st_nlink != 1:
                raise PathRefused(
                    f"refusing {path}: it has {fst.st_nlink} links (a hard link may name a "
                    "file outside the recordings directories)"
                )
            os.set_blocking(fd, True)
            head = os.pread(fd, HEADER_PROBE, 0)
            fileobj = _PlaintextFile(fd, dir_fd)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        os.close(dir_fd)
        raise
    return SourceFile(
        path=path,
        fileobj=fileobj,
        size=fst.st_size,
        fingerprint=fingerprint_of(fst),
        device=fst.st_dev,
        inode=fst.st_ino,
        name=name,
        mtime_ns=fst.st_mtime_ns,
        head=head,
    )


def vet_path(path: str, allowed_dirs: Sequence[str]) -> None:
    """Refuse a path without opening the file: the same walk as ``open_source``.

    A missing file is not refused (the job reports it); a symlink, a
    non-regular file, a symlinked or missing directory on the way, or a path
    outside ``allowed_dirs`` is.
    """
    try:
        dir_fd, name = _parent_fd(path, allowed_dirs)
    except InputFileError:
        return
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PathRefused(f"refusing {path!r}: cannot stat it ({exc.strerror})") from None
    finally:
        os.close(dir_fd)
    if stat.S_ISLNK(st.st_mode):
        raise PathRefused(f"refusing {path}: it is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise PathRefused(f"refusing {path}: not a regular file")


def content_changed(source: SourceFile) -> str | None:
    """Why the opened file's content is no longer what was opened (None if unchanged).

    Checked on the descriptor: an append or a rewrite in place changes its
    size or mtime, whatever its name now points at.
    """
    if source.dir_fd is None:
        return "the file is no longer open"
    fst = os.fstat(source.fileobj.fileno())
    if (fst.st_size, fst.st_mtime_ns) != (source.size, source.mtime_ns):
        return f"it changed since it was opened ({source.size} -> {fst.st_size} bytes)"
    return None


def source_changed(source: SourceFile) -> str | None:
    """Why the name no longer points at the unchanged file opened (None when it does).

    The content is checked on the descriptor (an append or rewrite in place)
    and the name relative to the parent's descriptor (a rename or replacement).
    """
    dir_fd = source.dir_fd
    reason = content_changed(source)
    if reason is not None or dir_fd is None:
        return reason
    try:
        st = os.stat(source.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "its name was removed"
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (source.device, source.inode):
        return "its name now points at another file"
    if (st.st_size, st.st_mtime_ns) != (source.size, source.mtime_ns) or st.st_nlink != 1:
        return "it changed since it was opened"
    return None


def delete_plaintext(source: SourceFile) -> bool:
    """Unlink the plaintext if the name still points at the very file we stored, unchanged.

    Returns False (and deletes nothing) when the name now refers to another
    file, or the file grew or was rewritten since it was opened: those bytes
    were never stored, so they must not be removed. The unlink is by name
    relative to the parent directory's descriptor from the safe walk.
    """
    dir_fd = source.dir_fd
    if dir_fd is None or source_changed(source) is not None:
        return False
    try:
        os.unlink(source.name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    os.fsync(dir_fd)
    return True


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_source_if_unchanged(path: str, fingerprint: str, allowed_dirs: Sequence[str]) -> bool:
    """Delete a recording's plaintext if it is still exactly the file the row describes.

    Used by erasure: a failed row (or one stored with delete_plaintext off)
    may still have its WAV on disk, and an erased recording must not survive
    as plaintext. Only a regular file inside the recordings directories whose
    identity (device, inode, size, mtime) matches the row is removed, through
    the same descriptor walk as the daemon's.
    """
    try:
        source = open_source(path, allowed_dirs)
    except (InputFileError, PathRefused):
        return False
    try:
        if source.fingerprint != fingerprint:
            return False
        return delete_plaintext(source)
    finally:
        source.fileobj.close()


def _riff_chunks(head: bytes) -> Iterator[tuple[bytes, int, int]]:
    """``(chunk id, size field, body offset)`` of each chunk header within ``head``."""
    offset = 12
    while offset + 8 <= len(head):
        chunk_id, size = head[offset : offset + 4], struct.unpack_from("<I", head, offset + 4)[0]
        yield chunk_id, size, offset + 8
        offset = offset + 8 + size + (size & 1)


def wav_state(head: bytes, file_size: int, name: str = "") -> str:
    """Is this a finished WAV? ``complete``, ``incomplete`` or ``not-wav``.

    FreeSWITCH writes a placeholder header while recording and the real
    sizes only when it closes the file, so a WAV is complete when the RIFF
    size is the file's size minus 8 and the data chunk ends within the file.
    A ``.wav`` name too short to hold a header is still being created. Any
    other file (an .mp3, say) is ``not-wav``: it is stored as it is.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        short = len(head) < 12 and b"RIFF".startswith(head[:4])
        return "incomplete" if short and name.lower().endswith(".wav") else "not-wav"
    (riff_size,) = struct.unpack_from("<I", head, 4)
    if riff_size + 8 != file_size:
        return "incomplete"
    for chunk_id, size, body in _riff_chunks(head):
        if chunk_id == b"data":
            return "complete" if body + size <= file_size else "incomplete"
    return "incomplete"


def wav_info(head: bytes, file_size: int) -> dict[str, Any]:
    """Format facts from a RIFF/WAVE header, for the row's metadata (empty if not a WAV)."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return {}
    info: dict[str, Any] = {"container": "wav"}
    for chunk_id, size, body in _riff_chunks(head):
        if chunk_id == b"fmt " and body + 16 <= len(head):
            tag, channels, rate, byte_rate, _align, bits = struct.unpack_from("<HHIIHH", head, body)
            info.update(format_tag=tag, channels=channels, sample_rate=rate, bits=bits)
            info["byte_rate"] = byte_rate
        elif chunk_id == b"data":
            data_size = min(size, max(0, file_size - body))
            info["data_bytes"] = data_size
            if info.get("byte_rate"):
                info["duration_s"] = round(data_size / info["byte_rate"], 3)
            break
    return info


# --- reading objects ---------------------------------------------------------------------


class IterReader(io.RawIOBase):
    """A read-only file object over an iterator of byte chunks (a store's GET body).

    When the chunks come from a body that can fill a buffer itself (S3's,
    see ``store._S3Body.readinto``), reads go straight to it once no chunk
    is pending: the caller's buffer is filled from the socket's data in one
    copy, instead of a chunk being allocated and then copied again here.
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


def read_object_header(store: ObjectStore, key: str, object_size: int) -> esdk.Header:
    """Fetch just the header: a small ranged read, grown if the header is larger."""
    probe = min(HEADER_PROBE, object_size)
    while True:
        data = store.read_bytes(key, 0, probe)
        try:
            return esdk.parse_header(data)
        except TruncatedMessage:
            if probe >= object_size:
                raise
            probe = min(object_size, probe * 4)


class HeaderCache:
    """Recently verified object headers, so a player's seeks skip one request each.

    Only a header that verified (key commitment and header tag, under the
    data key unwrapped from the database's copy) is put here, and an entry
    is used only while the object's identity from the store's HEAD (size,
    etag, version, local stamp) is the one it was read under: a rewritten,
    tampered or restored object misses the cache and has its header read
    and verified again at once. A read that fails in any way drops the entry
    (``drop``), so a bad object is never served from memory. Entries hold
    only the wrapped data key and expire after ``ttl`` seconds, so even that
    does not linger after an erasure; every read still unwraps the key from
    the database's copy and checks the row's status first.
    """

    def __init__(self, size: int = 1024, ttl: float = 300.0) -> None:
        import threading
        from collections import OrderedDict

        self._entries: OrderedDict[str, tuple[float, tuple[Any, ...], bytes]] = OrderedDict()
        self._size = size
        self._ttl = ttl
        self._lock = threading.Lock()

    def get(self, key: str, identity: tuple[Any, ...]) -> esdk.Header | None:
        """The verified header cached for ``key`` if the object is still ``identity``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if time.monotonic() - entry[0] > self._ttl or entry[1] != identity:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
        return esdk.parse_header(entry[2])

    def put(self, key: str, identity: tuple[Any, ...], header: esdk.Header) -> None:
        """Remember ``header``; call only once it verified with the recording's data key."""
        with self._lock:
            self._entries[key] = (time.monotonic(), identity, header.raw)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        """Forget ``key``: a read of that object failed."""
        with self._lock:
            self._entries.pop(key, None)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries


def object_identity(info: ObjectInfo) -> tuple[Any, ...]:
    """What must be unchanged for a cached header to still be the object's header."""
    return (info.size, info.etag, info.version_id, info.stamp)


# --- the services a job needs -------------------------------------------------------------


@dataclass
class Services:
    """Config plus lazily built adapters, so a command pays only for what it uses."""

    config: Config
    _db: Database | None = field(default=None, repr=False)
    _keys: KeyProvider | None = field(default=None, repr=False)
    _store: ObjectStore | None = field(default=None, repr=False)
    headers: HeaderCache = field(default_factory=HeaderCache, repr=False)

    @property
    def db(self) -> Database:
        if self._db is None:
            from fsrecrypt.db import Database

            self._db = Database(
                self.config.database.dsn,
                max_connections=max(4, self.config.pipeline.concurrency + 2),
                connect_timeout=self.config.database.connect_timeout,
            )
        return self._db

    @property
    def keys(self) -> KeyProvider:
        if self._keys is None:
            from fsrecrypt.keys import build_key_provider

            self._keys = build_key_provider(self.config.keys)
        return self._keys

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            from fsrecrypt.store import build_store

            self._store = build_store(self.config.storage)
        return self._store

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def worker_id(prefix: str | None = None) -> str:
    """Who holds a claim: host and pid, so a restarted daemon can drop its own stale leases."""
    return f"{prefix or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def host_worker_prefix() -> str:
    return f"{socket.gethostname()}:"


def encryption_context(tenant_id: str, recording_id: str) -> dict[str, str]:
    """Identifiers only: the context travels in clear in the object header and KMS logs."""
    return {"tenant_id": tenant_id, "recording_id": recording_id}


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
) -> StoreOutcome:
    """Encrypt one claimed recording into the store, mark it stored, then drop the plaintext.

    ``claimed``: the row as returned by a claim this ``worker`` already holds
    (the daemon claims and reads the tenant in one statement); the claim is
    then not taken a second time. Anything else is claimed here.
    """
    config = services.config
    delete = config.pipeline.delete_plaintext if delete is None else delete
    if recording.status == "stored":
        deleted = (
            delete and services.store.exists(recording.s3_path or "") and delete_plaintext(source)
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
    context = encryption_context(tenant.id, recording.id)
    data_key = services.keys.generate_data_key(tenant.kms_key_id, context)
    encryptor = esdk.Encryptor(
        data_key.plaintext,
        [data_key.encrypted],
        context,
        frame_length=config.pipeline.frame_size,
    )
    from fsrecrypt.store import object_key

    # A per-attempt suffix: a zombie worker whose lease expired can never
    # overwrite the object a later attempt stored and recorded.
    key = object_key(
        config.storage.prefix,
        tenant.id,
        f"{recording.id}.{secrets.token_hex(4)}",
        recording.created_at,
    )
    source.fileobj.seek(0)
    head = source.fileobj.read(HEADER_PROBE)
    source.fileobj.seek(0)

    def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if on_chunk is not None:
                on_chunk(len(chunk))
            yield chunk

    info = services.store.put_stream(
        key,
        counted(encryptor.stream(source.fileobj)),
        metadata={"fsrecrypt-recording-id": recording.id, "fsrecrypt-tenant-id": tenant.id},
    )
    elapsed = time.monotonic() - started
    changed = (
        f"{source.size} bytes at open, {encryptor.plaintext_length} read"
        if encryptor.plaintext_length != source.size
        else content_changed(source)
    )
    if changed is not None:
        # What was read is not the file as it is now: never mark it stored.
        services.store.delete(key)
        raise SourceChanged(f"{source.path} changed while it was read ({changed})")
    metadata = {
        "message_id": encryptor.header.message_id.hex(),
        "frame_length": config.pipeline.frame_size,
        "suite": f"0x{esdk.SUITE_ID:04X}",
        "header_size": encryptor.header.size,
        "store": services.store.name,
        "key_provider": services.keys.name,
        **({"wav": wav_info(head, source.size)} if head[:4] == b"RIFF" else {}),
    }
    if info.version_id:
        metadata["object_version"] = info.version_id
    try:
        stored = services.db.mark_stored(
            recording.id,
            encryption_algorithm=ALGORITHM_NAME,
            encrypted_dek=edk_to_bytes(data_key.encrypted),
            kms_key_id=data_key.key_id,
            s3_path=key,
            file_size_bytes=encryptor.plaintext_length,
            encrypted_size_bytes=encryptor.ciphertext_length,
            metadata=metadata,
            claimed_by=worker,
            audit={
                "action": "encrypt",
                "user_id": user_id,
                "success": True,
                "decryption_duration_ms": elapsed * 1000,
                "details": {"object_key": key, "bytes": encryptor.plaintext_length},
            },
        )
    except InvalidState:
        # Someone else owns the row now; our object is an orphan: remove it.
        with contextlib.suppress(FsrecryptError):
            services.store.delete(key)
        raise
    deleted = bool(delete) and delete_plaintext(source)
    return StoreOutcome(
        stored,
        key,
        encryptor.plaintext_length,
        encryptor.ciphertext_length,
        elapsed,
        deleted,
        source_changed=bool(delete) and not deleted and content_changed(source) is not None,
    )


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
                services.db.record_attempt_failure(recording.id, exc.one_line(), final=final)
            raise
    finally:
        source.fileobj.close()


# --- the way back ----------------------------------------------------------------------------


@dataclass
class OpenedRecording:
    """A stored recording ready to be read: header verified, content key derived."""

    recording: Recording
    header: esdk.Header
    content_key: bytes = field(repr=False)
    data_key: bytes = field(repr=False)
    object_size: int
    plaintext_size: int


def check_readable(recording: Recording) -> str:
    """The object key of a recording that can be read, or the typed reason it cannot."""
    if recording.status == "erased":
        raise RecordingGone(f"recording {recording.id} was erased")
    if recording.status != "stored" or not recording.s3_path:
        raise InvalidState(f"recording {recording.id} is {recording.status}, not stored")
    return recording.s3_path


def unwrap_data_key(services: Services, recording: Recording, header: esdk.Header) -> bytes:
    """The data key from the database's copy, once the header is shown to be this recording's.

    The header's context must be exactly the row's (tenant and recording):
    an object swapped between recordings or tenants is refused before any
    key is used. Both that and a wrapped key that does not authenticate
    under the recording's own context are integrity failures
    (``ObjectMismatch``), not key outages: retrying cannot help, and they
    must be audited as tampering. A provider that cannot be reached still
    raises its transient ``KeyProviderUnavailable``.
    """
    from fsrecrypt.keys import DataKeyAuthenticationFailed

    context = encryption_context(recording.tenant_id, recording.id)
    if dict(header.encryption_context) != context:
        raise ObjectMismatch(
            f"object {recording.s3_path} belongs to another recording or tenant",
            hint="The object was swapped or misfiled; treat it as tampered and do not play it.",
        )
    edk = edk_from_bytes(recording.encrypted_dek_bytes())
    try:
        return services.keys.decrypt_data_key([edk], context)
    except DataKeyAuthenticationFailed:
        raise ObjectMismatch(
            f"the wrapped data key of recording {recording.id} does not authenticate "
            "under its tenant/recording context"
        ) from None


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

    The header comes from the cache only while the object's identity is
    unchanged; a header read from the store is cached only after it
    verified. Any failure drops the cache entry.
    """
    key = check_readable(recording)
    info = services.store.head(key)
    identity = object_identity(info)
    header = services.headers.get(key, identity)
    cached = header is not None
    try:
        if header is None:
            header = read_object_header(services.store, key, info.size)
        data_key = unwrap_data_key(services, recording, header)
        content_key = esdk.verify_header(header, data_key)
        size = checked_plaintext_size(recording, header, info.size)
    except FsrecryptError:
        services.headers.drop(key)
        raise
    if not cached:
        services.headers.put(key, identity, header)
    return OpenedRecording(recording, header, content_key, data_key, info.size, size)


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
        chunks = services.store.get_range(key, plan.ciphertext_start, plan.ciphertext_end)
    except FsrecryptError:
        services.headers.drop(key)
        raise
    return plan, _dropping_on_failure(
        services,
        key,
        esdk.decrypt_range(opened.header, opened.content_key, plan, chunks, opened.object_size),
    )


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
        details={"bytes": written},
    )
    return opened


def now_utc() -> datetime:
    return datetime.now(UTC)


def encode_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
