"""The S3 store (any S3 API: AWS, MinIO, moto through ``endpoint_url``).

boto3 and botocore are imported here, at the top: :mod:`fsrecrypt.store`
imports this module only when S3 is configured or ``S3Store`` is named, so
the local path never loads botocore.
``S3Store`` uses plain client calls rather than boto3's threaded transfer
manager: we control memory (one part buffered), checksums and the
abort-on-failure path ourselves, and it behaves under gevent.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from botocore.response import StreamingBody

from fsrecrypt.errors import ObjectExists, ObjectNotFound, StorageError
from fsrecrypt.store.base import (
    READ_CHUNK,
    InvalidObjectKey,
    ObjectAccessDenied,
    ObjectChanged,
    ObjectInfo,
    ObjectStore,
    StorageAccessError,
    _check_range,
)
from fsrecrypt.store.s3_lock import S3ObjectLock

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
MAX_PARTS = 10_000

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


def _check_options(object_lock: str, part_size: int, sse: str) -> None:
    if object_lock not in ("", "governance", "compliance"):
        raise ValueError("object_lock must be '', 'governance' or 'compliance'")
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise ValueError("part_size must be between 5 MiB and 5 GiB")
    if sse not in ("", "AES256", "aws:kms"):
        raise ValueError("sse must be '', 'AES256' or 'aws:kms'")


class S3Store(S3ObjectLock, ObjectStore):
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
        object_lock: str = "",
        retention_days: int = 0,
        governance_bypass: bool = False,
        max_pool_connections: int = 10,
    ) -> None:
        _check_options(object_lock, part_size, sse)
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self.endpoint_url = endpoint_url or None
        self.sse = sse
        self.sse_kms_key_id = sse_kms_key_id
        self.part_size = part_size
        self.object_lock = object_lock
        self.max_pool_connections = max_pool_connections
        self.retention_days = retention_days
        self.governance_bypass = governance_bypass
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
                    connect_timeout, read_timeout, max_attempts = self._timeouts
                    self._client = boto3.session.Session().client(
                        "s3",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        config=Config(
                            connect_timeout=connect_timeout,
                            read_timeout=read_timeout,
                            retries={"mode": "standard", "max_attempts": max_attempts},
                            max_pool_connections=self.max_pool_connections,
                        ),
                    )
        return self._client

    def _call(self, op: str, key: str, **kwargs: Any) -> dict[str, Any]:
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
            **self._lock_args(),
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
                        if _known_to_exist(self, key):
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
                    # Object Lock puts must name their checksum algorithm.
                    **({"ChecksumAlgorithm": "SHA256"} if common.get("ObjectLockMode") else {}),
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
        return _object_info(key, size, resp)

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

    def get_range(
        self,
        key: str,
        start: int = 0,
        end: int | None = None,
        *,
        expect: ObjectInfo | None = None,
    ) -> Iterator[bytes]:
        _check_range(start, end)
        resp = None if end == start else _ranged_get(self, key, start, end, expect)
        return iter(()) if resp is None else _S3Body(resp["Body"], key)

    def read_described(self, key: str, start: int, end: int) -> tuple[bytes, ObjectInfo]:
        """One GET: the bytes, and the object's identity from its answer's headers."""
        _check_range(start, end)
        resp = None if end == start else _ranged_get(self, key, start, end, None)
        size = None if resp is None else _total_size(resp)
        if resp is None or size is None:
            # Nothing to read (an empty object, a start past the end) or a store
            # that does not say the size: ask, and read under that identity.
            if resp is not None:
                resp["Body"].close()
            info = self.head(key)
            return b"".join(self.get_range(key, start, end, expect=info)), info
        with contextlib.closing(_S3Body(resp["Body"], key)) as body:
            return b"".join(body), _object_info(key, size, resp)

    def head(self, key: str) -> ObjectInfo:
        resp = self._call("head_object", key, Key=key)
        return _object_info(key, int(resp["ContentLength"]), resp)

    def delete(self, key: str) -> int:
        """Delete every version and delete marker of ``key`` (needs s3:ListBucketVersions).

        Under governance Object Lock with ``governance_bypass`` the request
        bypasses governance retention (s3:BypassGovernanceRetention); the
        caller decides that it may (``erase --override-retention``). Compliance
        retention and legal holds are never bypassed: S3 refuses, and this
        raises ``StorageAccessError`` naming why.
        """
        doomed = [{"Key": key, "VersionId": v} for v in self._version_ids(key)]
        extra: dict[str, Any] = {}
        if self.object_lock == "governance" and self.governance_bypass:
            extra["BypassGovernanceRetention"] = True
        deleted = 0
        for i in range(0, len(doomed), 1000):
            batch = doomed[i : i + 1000]
            resp = self._call(
                "delete_objects", key, Delete={"Objects": batch, "Quiet": True}, **extra
            )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                locked = " (S3 Object Lock retention or legal hold)" if self.object_lock else ""
                raise StorageAccessError(
                    f"S3 could not delete {len(resp['Errors'])} version(s) of {key}: "
                    f"{first.get('Code')}{locked}"
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
        # No HeadBucket (it needs s3:ListBucket) nor version listing: the probe's
        # PutObject and the DeleteObject(Version) of just what it wrote are all a
        # writer's role needs (conf/iam/daemon.json).
        probe = f"{self.prefix}.fsrecrypt-check/{secrets.token_hex(8)}"
        info = self.put_stream(probe, [b"ok"])
        version = {"VersionId": info.version_id} if info.version_id else {}
        self._call("delete_object", probe, Key=probe, **version)


def _ranged_get(
    store: S3Store, key: str, start: int, end: int | None, expect: ObjectInfo | None
) -> dict[str, Any] | None:
    """The GetObject answer for ``[start, end)``; None when the range starts past the end.

    With ``expect``, the read is conditional on the object ``expect`` describes:
    ``If-Match`` with its ETag (S3 checks it on the GET itself: no HEAD before
    each read) and its size in the answer's ``Content-Range``; ``ObjectChanged``
    otherwise. Not ``VersionId``: naming a version needs s3:GetObjectVersion,
    which the playback role does not have (conf/iam/playback.json), and the
    ETag already tells another object's bytes from these.
    """
    kwargs: dict[str, Any] = {"Key": key}
    if start or end is not None:
        kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    if expect is not None and expect.etag:
        kwargs["IfMatch"] = f'"{expect.etag}"'
    changed = f"object {key} changed since it was last read"
    try:
        resp = store._call("get_object", key, **kwargs)
    except _RangeNotSatisfiable:
        if expect is not None and start < expect.size:
            raise ObjectChanged(changed) from None
        return None
    except ObjectExists:  # 412: the If-Match failed
        raise ObjectChanged(changed) from None
    if expect is not None and _total_size(resp) not in (None, expect.size):
        resp["Body"].close()
        raise ObjectChanged(changed)
    return resp


def _known_to_exist(store: S3Store, key: str) -> bool:
    """``exists``, but a writer that may not read (HeadObject needs s3:GetObject,
    which the daemon's role does not have: conf/iam/daemon.json) answers False
    and relies on If-None-Match at completion."""
    try:
        return store.exists(key)
    except ObjectAccessDenied:
        return False


def _object_info(key: str, size: int, resp: Mapping[str, Any]) -> ObjectInfo:
    """Identity of an object from a HEAD's or a GET's answer."""
    etag = resp.get("ETag")
    return ObjectInfo(
        key=key,
        size=size,
        etag=etag.strip('"') if isinstance(etag, str) else None,
        version_id=resp.get("VersionId"),
    )


def _total_size(resp: Mapping[str, Any]) -> int | None:
    """The object's whole size as a GET answered it (``Content-Range: bytes a-b/TOTAL``)."""
    content_range = resp.get("ContentRange")
    if isinstance(content_range, str) and "/" in content_range:
        total = content_range.rpartition("/")[2]
        return int(total) if total.isascii() and total.isdigit() else None
    if content_range is None and isinstance(resp.get("ContentLength"), int):
        return int(resp["ContentLength"])  # a whole-object GET
    return None


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
    if (code == "AccessDenied" or status == 403) and op in ("get_object", "head_object"):
        return ObjectAccessDenied(f"{where}: access denied (HTTP {status})")
    return StorageAccessError(f"{where}: {code} (HTTP {status})")
