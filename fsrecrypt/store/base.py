"""The object store contract and the types every store shares.

Both stores keep one contract, chosen for what the pipeline needs:

* ``put_stream`` consumes an iterable of ciphertext chunks exactly once with
  bounded memory and publishes the object atomically: either the complete
  object exists afterwards or nothing does (no partial file, no orphaned
  multipart upload), even if the iterator itself raises half way (an
  encryption error, a cancelled greenlet). Existing objects are never
  overwritten: object keys are unique per recording, so a collision is a bug.
* ``get_range`` is one contiguous read (one ranged GET for S3), which is what
  random access into framed ESDK messages needs.
* ``delete`` removes every version: crypto-shredding and retention must not
  leave old versions behind in a versioned bucket.

Object keys are built here (:func:`object_key`) from identifiers only.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from fsrecrypt.errors import ObjectNotFound, StorageError

READ_CHUNK = 256 * 1024
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class InvalidObjectKey(StorageError):
    """An object key is empty, absolute, or would leave the store's root."""

    hint = "Object keys are relative paths without '.', '..' or hidden components."
    transient = False


class StorageAccessError(StorageError):
    """The store refused the request (permissions, missing bucket, bad request).

    Separate from plain ``StorageError`` because retrying cannot help.
    """

    transient = False


class ObjectAccessDenied(StorageAccessError):
    """This process may not read an object (EACCES/EPERM, S3 AccessDenied): a permission,
    not damage. ``verify`` reports it apart, so nobody restores an intact object."""

    hint = (
        "The object may well be intact: run the command as the service user that owns the "
        "store ('sudo -u fsrecrypt fsrecrypt ...'), or fix the object's owner and mode "
        "(or the credentials' S3 permissions)"
    )


class ObjectChanged(StorageError):
    """The object is no longer the one a caller read before (another size, etag, version
    or file): a conditional read (``get_range(..., expect=...)``) found it replaced.

    Why typed: a reader holding a cached view of the object (the verified
    header behind a player's seeks) reads again from scratch on this, rather
    than decrypting a replaced object against stale facts.
    """

    hint = "Read the object again: it was replaced since it was last read"
    transient = False


@dataclass(frozen=True)
class ObjectInfo:
    """Size and identity of a stored object (etag/version only where the store has them).

    ``stamp``: for stores without an etag (the local store), a token that
    changes whenever the object's bytes may have changed (inode, mtime and
    ctime), so a reader can tell that a cached view of the object is stale.
    """

    key: str
    size: int
    etag: str | None = None
    version_id: str | None = None
    stamp: str | None = None


@dataclass(frozen=True)
class LockState:
    """What the storage itself enforces on an object: Object Lock retention and legal hold."""

    mode: str = ""
    retain_until: datetime | None = None
    legal_hold: bool = False

    def retained_at(self, now: datetime) -> bool:
        return self.retain_until is not None and now < self.retain_until


class ObjectStore(ABC):
    """Where encrypted recordings live."""

    name: str

    @abstractmethod
    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Store the concatenated chunks under ``key`` atomically; refuse to overwrite."""

    @abstractmethod
    def get_range(
        self,
        key: str,
        start: int = 0,
        end: int | None = None,
        *,
        expect: ObjectInfo | None = None,
    ) -> Iterator[bytes]:
        """Bytes ``[start, end)`` (``end=None``: to the end), streamed in chunks.

        The object is opened (or the request made) before this returns, so a
        missing object raises here rather than on the first ``next()``. A range
        beyond the object's end yields what exists (possibly nothing).

        ``expect``: read only if the object is still the one ``head`` described
        (its size and its etag or stamp), else ``ObjectChanged``. The check
        rides on the read itself (S3: ``If-Match`` on the GET and the size in its
        ``Content-Range``; local: ``fstat`` of the opened file), so a reader that
        already knows the object pays no extra request for it.
        """

    def read_bytes(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """A small range in one piece (headers, trailers)."""
        return b"".join(self.get_range(key, start, end))

    def read_described(self, key: str, start: int, end: int) -> tuple[bytes, ObjectInfo]:
        """A small range in one piece and the identity of the object it came from.

        Why: a reader that needs both (a player opening a recording: its
        header and what to make later reads conditional on) gets them from
        one request where the store can (S3: the GET's ETag, VersionId and
        Content-Range); this default asks for the identity first.
        """
        info = self.head(key)
        return b"".join(self.get_range(key, start, end, expect=info)), info

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and identity; ``ObjectNotFound`` if absent."""

    @abstractmethod
    def delete(self, key: str) -> int:
        """Delete the object (all versions); returns how many entries were removed."""

    object_lock: str = ""
    """"governance" or "compliance" where the storage itself enforces retention."""

    def lock_state(self, key: str) -> LockState:
        """The storage's own retention and legal hold on ``key`` (none for plain stores)."""
        return LockState()

    def set_legal_hold(self, key: str, on: bool) -> int:
        """Set or release the storage's legal hold on every version; returns versions changed."""
        return 0

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Object keys starting with ``prefix``."""

    @abstractmethod
    def abort_incomplete_uploads(self, older_than_seconds: float = 0) -> int:
        """Clean up what crashed writers left behind; returns how many were removed."""

    @abstractmethod
    def check(self) -> None:
        """Raise ``StorageError`` unless the store is reachable and writable."""


def _check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end})")


def object_key(prefix: str, tenant_id: str, recording_id: str, created: datetime) -> str:
    """``{prefix}{tenant}/{yyyy}/{mm}/{dd}/{recording_id}.esdk`` (UTC date).

    Only identifiers go into the key (object keys show up in bucket listings,
    access logs and inventories in clear): never caller numbers or names. A
    non-empty prefix without a trailing '/' gets one, so ``rec`` and ``rec/``
    give the same layout.
    """
    for what, value in (("tenant id", tenant_id), ("recording id", recording_id)):
        if not isinstance(value, str) or not _ID_RE.fullmatch(value) or value in (".", ".."):
            raise InvalidObjectKey(f"{what} {value!r} cannot be used in an object key")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if created.tzinfo is not None:
        created = created.astimezone(UTC)
    return (
        f"{prefix}{tenant_id}/{created.year:04d}/{created.month:02d}/{created.day:02d}/"
        f"{recording_id}.esdk"
    )
