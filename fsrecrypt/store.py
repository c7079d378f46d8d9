"""Object stores for encrypted recordings: a local directory or S3.

Both stores share one contract, chosen for what the pipeline needs:

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

boto3 is imported inside ``S3Store`` only, so the local path never imports
botocore. ``S3Store`` uses plain client calls rather than boto3's threaded
transfer manager: we control memory (one part buffered), checksums and the
abort-on-failure path ourselves, and it behaves under gevent.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsrecrypt.config import StorageConfig
from fsrecrypt.errors import ObjectExists, ObjectNotFound, StorageError

if TYPE_CHECKING:  # pragma: no cover
    from botocore.client import BaseClient

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
MAX_PARTS = 10_000
READ_CHUNK = 256 * 1024
_TMP_MARKER = ".tmp-"
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


class ObjectStore(ABC):
    """Where encrypted recordings live."""

    name: str

    @abstractmethod
    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Store the concatenated chunks under ``key`` atomically; refuse to overwrite."""

    @abstractmethod
    def get_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` (``end=None``: to the end), streamed in chunks.

        The object is opened (or the request made) before this returns, so a
        missing object raises here rather than on the first ``next()``. A range
        beyond the object's end yields what exists (possibly nothing).
        """

    def read_bytes(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """A small range in one piece (headers, trailers)."""
        return b"".join(self.get_range(key, start, end))

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and identity; ``ObjectNotFound`` if absent."""

    @abstractmethod
    def delete(self, key: str) -> int:
        """Delete the object (all versions); returns how many entries were removed."""

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


@contextlib.contextmanager
def _io_errors(what: str) -> Iterator[None]:
    """Turn an OSError from our own file I/O into a StorageError naming the object."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{what}: {exc.strerror or type(exc).__name__}") from None


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


# --- local directory -------------------------------------------------------------


class LocalStore(ObjectStore):
    """Objects as files under a root directory.

    Writes go to ``.<name>.tmp-<random>`` in the destination directory, are
    fsynced, then published with ``link()`` (which, unlike ``rename()``,
    fails if the target exists, so publishing and the no-overwrite check are
    one atomic step), and the directory is fsynced so the name survives a
    crash. Hidden names are reserved for temp files, so keys may not contain
    components starting with '.'. ``metadata`` is not persisted locally.
    """

    name = "local"

    def __init__(self, root: str | os.PathLike[str], prefix: str = "") -> None:
        self.root = Path(root)
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or "\x00" in key or "\\" in key:
            raise InvalidObjectKey(f"object key {key!r} is not a relative path")
        parts = key.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise InvalidObjectKey(f"object key {key!r} has an empty, '..' or hidden component")
        path = self.root.joinpath(*parts)
        # A symlinked directory inside the root must not lead outside it either.
        root_real = os.path.realpath(self.root)
        parent_real = os.path.realpath(path.parent)
        if os.path.commonpath([root_real, parent_real]) != root_real:
            raise InvalidObjectKey(f"object key {key!r} resolves outside the store root")
        return path

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        path = self._path(key)
        if path.exists() or path.is_symlink():
            raise ObjectExists(f"object {key} already exists")
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create directory for {key}: {exc.strerror}") from None
        self._path(key)  # re-check after mkdir: the parents now exist and resolve
        tmp = path.with_name(f".{path.name}{_TMP_MARKER}{secrets.token_hex(8)}")
        size = 0
        try:
            with _io_errors(f"cannot write object {key}"):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
            with os.fdopen(fd, "wb") as f:
                # Only our own I/O is translated: an exception from the chunk
                # iterator (e.g. reading the plaintext) passes through as is.
                for chunk in chunks:
                    with _io_errors(f"cannot write object {key}"):
                        f.write(chunk)
                    size += len(chunk)
                with _io_errors(f"cannot write object {key}"):
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ObjectExists(f"object {key} already exists") from None
            except OSError as exc:
                raise StorageError(f"cannot publish object {key}: {exc.strerror}") from None
        finally:
            # Success or failure (including KeyboardInterrupt or a failing
            # iterator): the temp name never outlives this call.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        try:
            self._fsync_dir(path.parent)
        except OSError as exc:
            raise StorageError(f"cannot sync directory of {key}: {exc.strerror}") from None
        return ObjectInfo(key=key, size=size)

    def get_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        _check_range(start, end)
        path = self._path(key)
        try:
            f = open(path, "rb")  # closed by the generator below
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found") from None
        except OSError as exc:
            raise StorageError(f"cannot read object {key}: {exc.strerror}") from None
        return self._iter_file(f, key, start, end)

    @staticmethod
    def _iter_file(f: Any, key: str, start: int, end: int | None) -> Iterator[bytes]:
        with f:
            try:
                f.seek(start)
                remaining = None if end is None else end - start
                while remaining is None or remaining > 0:
                    n = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                    data = f.read(n)
                    if not data:
                        return
                    if remaining is not None:
                        remaining -= len(data)
                    yield data
            except OSError as exc:
                raise StorageError(f"cannot read object {key}: {exc.strerror}") from None

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found") from None
        except OSError as exc:
            raise StorageError(f"cannot stat object {key}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"object {key} is not a regular file")
        stamp = f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        return ObjectInfo(key=key, size=st.st_size, stamp=stamp)

    def delete(self, key: str) -> int:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StorageError(f"cannot delete object {key}: {exc.strerror}") from None
        with contextlib.suppress(OSError):
            self._fsync_dir(path.parent)
        return 1

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """(key, path) for every regular, non-hidden file; temp files excluded."""
        base_dir = prefix.rpartition("/")[0]
        start = self.root.joinpath(*base_dir.split("/")) if base_dir else self.root
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, self.root)
            for name in sorted(filenames):
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                yield key, Path(dirpath, name)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        for key, _path in self._walk(prefix):
            if key.startswith(prefix) and not key.rpartition("/")[2].startswith("."):
                yield key

    def abort_incomplete_uploads(self, older_than_seconds: float = 0) -> int:
        cutoff = time.time() - older_than_seconds
        removed = 0
        for _key, path in self._walk(""):
            if not (path.name.startswith(".") and _TMP_MARKER in path.name):
                continue
            try:
                if path.lstat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot remove temp file {path}: {exc.strerror}") from None
        return removed

    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageAccessError(f"store root {self.root} is not a directory")
        probe = self.root / f".check{_TMP_MARKER}{secrets.token_hex(8)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StorageAccessError(
                f"store root {self.root} is not writable: {exc.strerror}"
            ) from None


# --- S3 ------------------------------------------------------------------------------

_S3_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}
_S3_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class S3Store(ObjectStore):
    """Objects in an S3 bucket (or any S3 API such as moto/MinIO via endpoint_url).

    Keys passed to the methods are full object keys (``object_key`` adds the
    configured prefix); ``prefix`` scopes ``abort_incomplete_uploads`` and
    the health-check probe.
    """

    name = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        sse: str = "",
        sse_kms_key_id: str = "",
        part_size: int = 8 * 1024 * 1024,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError("part_size must be between 5 MiB and 5 GiB")
        if sse not in ("", "AES256", "aws:kms"):
            raise ValueError("sse must be '', 'AES256' or 'aws:kms'")
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self.endpoint_url = endpoint_url or None
        self.sse = sse
        self.sse_kms_key_id = sse_kms_key_id
        self.part_size = part_size
        self._timeouts = (connect_timeout, read_timeout, max_attempts)
        self._client: BaseClient | None = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r})"

    @property
    def client(self) -> BaseClient:
        """The shared client, built on first use (boto3 clients are thread-safe)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    connect_timeout, read_timeout, max_attempts = self._timeouts
                    self._client = boto3.session.Session().client(
                        "s3",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        config=Config(
                            connect_timeout=connect_timeout,
                            read_timeout=read_timeout,
                            retries={"mode": "standard", "max_attempts": max_attempts},
                        ),
                    )
        return self._client

    def _call(self, op: str, key: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        try:
            return dict(getattr(self.client, op)(Bucket=self.bucket, **kwargs))
        except ClientError as exc:
            raise _map_s3_error(exc, op, self.bucket, key) from None
        except ParamValidationError as exc:  # a bug or a bad setting, not a network blip
            raise StorageAccessError(
                f"S3 {op} s3://{self.bucket}/{key}: invalid request ({exc})"
            ) from None
        except BotoCoreError as exc:
            raise StorageError(
                f"S3 {op} s3://{self.bucket}/{key} failed: {type(exc).__name__}"
            ) from None

    def _sse_args(self) -> dict[str, str]:
        if not self.sse:
            return {}
        args = {"ServerSideEncryption": self.sse}
        if self.sse == "aws:kms" and self.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args

    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        if not key or key.startswith("/"):
            raise InvalidObjectKey(f"object key {key!r} is not a relative key")
        common: dict[str, Any] = {
            "Key": key,
            "ContentType": "application/octet-stream",
            "Metadata": dict(metadata or {}),
            **self._sse_args(),
        }
        part_size = self.part_size
        buf = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        size = 0
        try:
            for chunk in chunks:
                buf += chunk
                size += len(chunk)
                # Strictly more than one part buffered: the object cannot be a
                # single PutObject any more, so stream parts out as they fill.
                while len(buf) > part_size:
                    if upload_id is None:
                        # Early out before sending gigabytes; CompleteMultipartUpload's
                        # If-None-Match is what makes the no-overwrite rule atomic.
                        if self.exists(key):
                            raise ObjectExists(f"object {key} already exists in s3://{self.bucket}")
                        upload_id = str(
                            self._call(
                                "create_multipart_upload",
                                key,
                                ChecksumAlgorithm="SHA256",
                                **common,
                            )["UploadId"]
                        )
                    with memoryview(buf) as view:  # one copy, not slice + copy
                        part = bytes(view[:part_size])
                    del buf[:part_size]
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, part))
                    del part
            if upload_id is None:
                body = bytes(buf)
                del buf
                # One integrity check, verified by S3 before it stores anything
                # (BadDigest otherwise): SHA-256. A Content-MD5 beside it only
                # re-checked the same bytes and cost more CPU than SHA-256.
                resp = self._call(
                    "put_object",
                    key,
                    Body=body,
                    ChecksumSHA256=_b64(hashlib.sha256(body).digest()),
                    IfNoneMatch="*",
                    **common,
                )
            else:
                if buf:
                    last = bytes(buf)
                    del buf
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, last))
                resp = self._call(
                    "complete_multipart_upload",
                    key,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )
        except BaseException:
            if upload_id is not None:
                self._abort(key, upload_id)
            raise
        etag = resp.get("ETag")
        return ObjectInfo(
            key=key,
            size=size,
            etag=etag.strip('"') if isinstance(etag, str) else None,
            version_id=resp.get("VersionId"),
        )

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        if number > MAX_PARTS:
            raise StorageError(
                f"object {key} needs more than {MAX_PARTS} parts of {self.part_size} bytes",
                hint="Raise [storage] part_size.",
            )
        checksum = _b64(hashlib.sha256(data).digest())
        resp = self._call(
            "upload_part",
            key,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
        )
        # Our own checksum, not the echoed one: S3 compares it on completion.
        return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}

    def _abort(self, key: str, upload_id: str) -> None:
        """Best effort: the original error matters more than a failed abort.

        A leftover upload is still found later by ``abort_incomplete_uploads``.
        """
        with contextlib.suppress(Exception):
            self._call("abort_multipart_upload", key, Key=key, UploadId=upload_id)

    def get_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        _check_range(start, end)
        if end is not None and end == start:
            return iter(())
        kwargs: dict[str, Any] = {"Key": key}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = self._call("get_object", key, **kwargs)
        except _RangeNotSatisfiable:
            return iter(())
        return _S3Body(resp["Body"], key)

    def head(self, key: str) -> ObjectInfo:
        resp = self._call("head_object", key, Key=key)
        etag = resp.get("ETag")
        return ObjectInfo(
            key=key,
            size=int(resp["ContentLength"]),
            etag=etag.strip('"') if isinstance(etag, str) else None,
            version_id=resp.get("VersionId"),
        )

    def delete(self, key: str) -> int:
        """Delete every version and delete marker of ``key`` (needs s3:ListBucketVersions)."""
        doomed: list[dict[str, str]] = []
        kwargs: dict[str, Any] = {"Prefix": key}
        while True:
            resp = self._call("list_object_versions", key, **kwargs)
            for entry in [*resp.get("Versions", []), *resp.get("DeleteMarkers", [])]:
                if entry.get("Key") == key:
                    doomed.append({"Key": key, "VersionId": str(entry.get("VersionId", "null"))})
            if not resp.get("IsTruncated"):
                break
            kwargs = {
                "Prefix": key,
                "KeyMarker": resp.get("NextKeyMarker"),
                "VersionIdMarker": resp.get("NextVersionIdMarker"),
            }
        deleted = 0
        for i in range(0, len(doomed), 1000):
            batch = doomed[i : i + 1000]
            resp = self._call("delete_objects", key, Delete={"Objects": batch, "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(
                    f"S3 could not delete {len(resp['Errors'])} version(s) of {key}: "
                    f"{first.get('Code')}"
                )
            deleted += len(batch)
        return deleted

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        kwargs: dict[str, Any] = {"Prefix": prefix}
        while True:
            resp = self._call("list_objects_v2", prefix, **kwargs)
            for obj in resp.get("Contents", []):
                yield str(obj["Key"])
            if not resp.get("IsTruncated"):
                return
            kwargs = {"Prefix": prefix, "ContinuationToken": resp["NextContinuationToken"]}

    def abort_incomplete_uploads(self, older_than_seconds: float = 0) -> int:
        cutoff = time.time() - older_than_seconds
        aborted = 0
        kwargs: dict[str, Any] = {"Prefix": self.prefix}
        while True:
            resp = self._call("list_multipart_uploads", self.prefix, **kwargs)
            for upload in resp.get("Uploads", []):
                initiated = upload.get("Initiated")
                if initiated is not None and initiated.timestamp() > cutoff:
                    continue
                with contextlib.suppress(ObjectNotFound):  # finished or aborted meanwhile
                    self._call(
                        "abort_multipart_upload",
                        upload["Key"],
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
                    aborted += 1
            if not resp.get("IsTruncated"):
                return aborted
            kwargs = {
                "Prefix": self.prefix,
                "KeyMarker": resp.get("NextKeyMarker"),
                "UploadIdMarker": resp.get("NextUploadIdMarker"),
            }

    def check(self) -> None:
        self._call("head_bucket", "")
        probe = f"{self.prefix}.fsrecrypt-check/{secrets.token_hex(8)}"
        self.put_stream(probe, [b"ok"])
        self.delete(probe)


class _RangeNotSatisfiable(StorageError):
    """Internal: a ranged GET starting at or past the end (HTTP 416)."""

    transient = False


class _S3Body(Iterator[bytes]):
    """A GetObject body: an iterator of chunks that can also fill a caller's buffer.

    ``get_range`` promises an iterator of chunks and most readers want just
    that (``READ_CHUNK`` at a time, through botocore). A reader that owns a
    buffer (the batched decryption behind ``/stream``, via
    ``pipeline.IterReader``) calls ``readinto`` instead, and the body lands
    in that buffer in reads as large as the buffer.

    ``readinto`` goes below botocore and urllib3 to the ``http.client``
    response they wrap, whose ``readinto`` receives from the socket straight
    into the buffer: urllib3's ``readinto`` reads into a new ``bytes`` and
    copies it, which was a tenth of the relay thread's CPU on a full read.
    Those layers only count bytes (re-done here: a body shorter than its
    Content-Length is a ``StorageError``, as botocore's check made it) and
    map errors (re-done here). The shortcut is taken only when that is all
    they would do: a plain ``StreamingBody`` (botocore wraps the body in a
    checksum-validating one when S3 returned a whole-object checksum, and
    that one is read through botocore so the check still runs), an
    identity-encoded body of known length, nothing read yet. Otherwise, or
    if the libraries' internals differ, botocore's ``readinto`` is used.

    Both paths map failures to ``StorageError`` and give the connection back
    at the end of the body (to the pool) or on ``close()``, as the generator
    this replaces did.
    """

    __slots__ = ("_body", "_closed", "_direct", "_key", "_raw")

    def __init__(self, body: Any, key: str) -> None:
        self._body = body
        self._key = key
        self._closed = False
        self._raw = getattr(body, "_raw_stream", None)  # urllib3.HTTPResponse
        self._direct = _plain_http_response(body, self._raw)

    def __iter__(self) -> _S3Body:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        chunk: bytes = self._guarded(self._body.read, READ_CHUNK)
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def readinto(self, buffer: Any) -> int:
        """Fill up to ``len(buffer)`` bytes of ``buffer``; 0 only at the end of the body."""
        if self._closed or not len(buffer):
            return 0
        direct = self._direct
        if direct is None:
            n: int = self._guarded(self._body.readinto, buffer)
            if not n:
                self.close()
            return n
        try:
            n = direct.readinto(buffer)
        except (OSError, ValueError) as exc:  # socket error or timeout; closed file
            self.close()
            raise StorageError(f"reading object {self._key} failed: {type(exc).__name__}") from None
        if direct.length:  # bytes still due under Content-Length
            if not n:
                self.close()
                raise StorageError(
                    f"reading object {self._key} failed: the body ended "
                    f"{direct.length} bytes short of its Content-Length"
                )
            return n
        # The whole body is in: the connection can serve the next request.
        with contextlib.suppress(Exception):
            self._raw.release_conn()
        self.close()
        return n

    def _guarded(self, read: Any, arg: Any) -> Any:
        from botocore.exceptions import BotoCoreError

        try:
            return read(arg)
        except BotoCoreError as exc:  # read timeout, truncated body
            self.close()
            raise StorageError(f"reading object {self._key} failed: {type(exc).__name__}") from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._body.close()

    def __del__(self) -> None:
        # An abandoned body still gives its connection up (the generator this
        # replaces did so when collected).
        with contextlib.suppress(Exception):
            self.close()


def _plain_http_response(body: Any, raw: Any) -> Any:
    """The ``http.client`` response under botocore's and urllib3's, if reading it is equivalent.

    That is: botocore adds no checksum validation (a plain ``StreamingBody``),
    nothing was read through urllib3 yet, it would decode nothing, and the
    length is known (Content-Length, not chunked). None otherwise.
    """
    import http.client

    from botocore.response import StreamingBody

    if type(body) is not StreamingBody:
        return None
    fp = getattr(raw, "_fp", None)
    headers = getattr(raw, "headers", None)
    if not isinstance(fp, http.client.HTTPResponse) or headers is None:
        return None
    if fp.chunked or fp.length is None or headers.get("Content-Encoding", "identity") != "identity":
        return None
    if getattr(raw, "_fp_bytes_read", 0):
        return None
    return fp


def _map_s3_error(exc: Any, op: str, bucket: str, key: str) -> StorageError:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", "Unknown"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    where = f"S3 {op} s3://{bucket}/{key}"
    if code in _S3_NOT_FOUND or (status == 404 and code not in ("NoSuchBucket", "NoSuchUpload")):
        return ObjectNotFound(f"{where}: not found")
    if code == "NoSuchUpload":
        return ObjectNotFound(f"{where}: multipart upload not found")
    if code in ("PreconditionFailed", "412") or status == 412:
        return ObjectExists(f"object {key} already exists in s3://{bucket}")
    if code == "InvalidRange" or status == 416:
        return _RangeNotSatisfiable(f"{where}: range not satisfiable")
    if code in _S3_TRANSIENT or status >= 500 or status == 429:
        return StorageError(f"{where}: {code} (HTTP {status})")
    return StorageAccessError(f"{where}: {code} (HTTP {status})")


def build_store(cfg: StorageConfig) -> ObjectStore:
    """The store named by ``[storage] backend``."""
    if cfg.backend == "local":
        return LocalStore(cfg.path, prefix=cfg.prefix)
    if cfg.backend == "s3":
        return S3Store(
            cfg.bucket,
            prefix=cfg.prefix,
            region=cfg.region,
            endpoint_url=cfg.endpoint_url or None,
            sse=cfg.sse,
            sse_kms_key_id=cfg.sse_kms_key_id,
            part_size=cfg.part_size,
        )
    raise StorageAccessError(f"unknown storage backend {cfg.backend!r}")
