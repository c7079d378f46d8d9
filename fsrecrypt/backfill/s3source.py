"""Plaintext recordings in an S3 bucket, as a backfill source: list, read, remove.

boto3 is imported here, at the top: :mod:`fsrecrypt.backfill.sources` loads
this module only for an ``s3://`` source.

The rules that make it safe to delete afterwards:

* the listing is paginated and streamed; in a versioned bucket every
  version is listed (older versions are plaintext too), one item per
  distinct content (ETag) of a key, the newest version holding it named;
* an item is read pinned to what was listed (``VersionId`` and ``If-Match``
  on its ETag), so the bytes stored are the bytes listed;
* removal deletes every version of the key with that ETag, and nothing when
  the key's current version now has another ETag (it changed since it was
  listed: reported, kept). In an unversioned bucket the delete carries
  ``If-Match`` too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fsrecrypt.backfill.sources import SourceObjectChanged, SourceObjectGone
from fsrecrypt.errors import StorageError

_CHANGED = {"PreconditionFailed", "412"}
_GONE = {"NoSuchKey", "NoSuchVersion", "404", "NotFound"}
_ACCESS = {"AccessDenied", "403", "AllAccessDisabled", "NoSuchBucket", "InvalidAccessKeyId"}


def _etag(value: str) -> str:
    return value.strip('"')


PAGE_SIZE = 1000
"""Keys (or versions) per listing request: S3's maximum."""
MAX_VERSIONS = 100
"""Version ids an item carries; a content stored in more versions is removed by listing them."""


@dataclass(frozen=True)
class ListedObject:
    """One content of a key: its newest version, whether it is current, and every version
    holding it (None: too many to carry)."""

    key: str
    etag: str
    size: int
    version_id: str | None
    latest: bool
    versions: list[str] | None = None


class ObjectReader(io.RawIOBase):
    """A GET's body as a readable file: the first bytes already read, one rewind to 0 allowed.

    The pipeline reads the head of a source, rewinds and reads it all; the
    head is kept in memory so that rewind costs nothing, and a network error
    mid-body surfaces as a (transient) ``StorageError``.
    """

    def __init__(self, body: Any, head_bytes: int, shown: str) -> None:
        super().__init__()
        self._body = body
        self._shown = shown
        self.head = self._read_body(head_bytes)
        self._pos = 0
        self._from_body = 0

    def _read_body(self, n: int) -> bytes:
        try:
            return bytes(self._body.read(n))
        except (BotoCoreError, OSError, ValueError) as exc:
            raise StorageError(f"reading {self._shown} failed: {exc}") from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._from_body == 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or self._from_body or not 0 <= offset <= len(self.head):
            raise io.UnsupportedOperation("an object stream rewinds only within its head")
        self._pos = offset
        return offset

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as view:
            if self._pos < len(self.head):
                n = min(len(view), len(self.head) - self._pos)
                view[:n] = self.head[self._pos : self._pos + n]
                self._pos += n
                return n
            data = self._read_body(len(view))
            view[: len(data)] = data
            self._from_body += len(data)
            self._pos += len(data)
            return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


class S3Source:
    """One bucket holding plaintext recordings; the client is built on first use."""

    def __init__(self, bucket: str, endpoint_url: str | None, region: str | None) -> None:
        self.bucket = bucket
        self._endpoint_url = endpoint_url or None
        self._region = region or None
        self._client: Any = None
        self._lock = threading.Lock()
        self._versioned: bool | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = boto3.session.Session().client(
                        "s3",
                        region_name=self._region,
                        endpoint_url=self._endpoint_url,
                        config=Config(
                            retries={"max_attempts": 5, "mode": "standard"},
                            max_pool_connections=32,
                            connect_timeout=10,
                            read_timeout=60,
                        ),
                    )
        return self._client

    def _call(self, op: str, what: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, op)(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _CHANGED:
                raise SourceObjectChanged(f"{what} changed since it was listed") from None
            if code in _GONE:
                raise SourceObjectGone(f"{what} no longer exists") from None
            err = StorageError(f"S3 {op} on {what} failed: {code or exc}")
            if code in _ACCESS:
                err.transient = False
                err.hint = "Check the source bucket name and the credentials' S3 permissions."
            raise err from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 {op} on {what} failed: {exc}") from None

    @property
    def versioned(self) -> bool:
        """Versioning enabled or suspended: versions must be listed and deleted one by one."""
        if self._versioned is None:
            resp = self._call("get_bucket_versioning", f"s3://{self.bucket}", Bucket=self.bucket)
            self._versioned = resp.get("Status") in ("Enabled", "Suspended")
        return self._versioned

    def iter_versions(self, prefix: str) -> Iterator[ListedObject]:
        """Every stored content below ``prefix``, one page at a time.

        A key's versions come together, newest first; they are gathered per
        key (one key's versions in memory, never the listing's), so each
        content's item names every version holding it.
        """
        if not self.versioned:
            for page in self._pages("list_objects_v2", prefix):
                for obj in page.get("Contents", []):
                    yield ListedObject(obj["Key"], _etag(obj["ETag"]), int(obj["Size"]), None, True)
            return
        key: str | None = None
        group: dict[str, ListedObject] = {}
        for page in self._pages("list_object_versions", prefix):
            for version in page.get("Versions", []):
                if version["Key"] != key:
                    yield from group.values()
                    key, group = version["Key"], {}
                etag = _etag(version["ETag"])
                found = group.get(etag)
                if found is None:
                    group[etag] = ListedObject(
                        version["Key"],
                        etag,
                        int(version["Size"]),
                        version["VersionId"],
                        bool(version.get("IsLatest")),
                        [version["VersionId"]],
                    )
                elif found.versions is not None and len(found.versions) < MAX_VERSIONS:
                    found.versions.append(version["VersionId"])
                else:  # too many to carry: removal lists the key's versions itself
                    group[etag] = dataclasses.replace(found, versions=None)
        yield from group.values()

    def _pages(self, op: str, prefix: str) -> Iterator[dict[str, Any]]:
        try:
            paginator = self.client.get_paginator(op)
            yield from paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": PAGE_SIZE}
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            err = StorageError(f"listing s3://{self.bucket}/{prefix} failed: {code or exc}")
            err.transient = code not in _ACCESS
            raise err from None
        except BotoCoreError as exc:
            raise StorageError(f"listing s3://{self.bucket}/{prefix} failed: {exc}") from None

    def open(self, key: str, etag: str, version_id: str | None, head_bytes: int) -> ObjectReader:
        """The listed content, pinned: ``SourceObjectChanged`` if it is not there any more."""
        shown = f"s3://{self.bucket}/{key}"
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "IfMatch": f'"{etag}"'}
        if version_id is not None:
            kwargs["VersionId"] = version_id
        resp = self._call("get_object", shown, **kwargs)
        return ObjectReader(resp["Body"], head_bytes, shown)

    def remove(self, key: str, etag: str, latest: bool, versions: list[str] | None = None) -> int:
        """Delete every version of ``key`` holding ``etag``; how many were deleted.

        ``versions``: the version ids the listing saw holding it (the key's
        versions are listed again when not given). Raises
        ``SourceObjectChanged`` (deleting nothing) when the item was the
        key's current content and the current version now holds another.
        """
        shown = f"s3://{self.bucket}/{key}"
        try:
            head = self._call("head_object", shown, Bucket=self.bucket, Key=key)
        except SourceObjectGone:  # deleted, or a delete marker is current
            head = None
        current = _etag(head["ETag"]) if head else None
        if latest and current not in (None, etag):
            raise SourceObjectChanged(f"{shown} changed since it was listed (ETag)")
        if not self.versioned:
            if current is None:
                return 0
            self._call("delete_object", shown, Bucket=self.bucket, Key=key, IfMatch=f'"{etag}"')
            return 1
        targets = list(versions) if versions is not None else self._versions_holding(key, etag)
        if head is not None and current == etag and head.get("VersionId") not in targets:
            targets.append(head["VersionId"])  # the same content stored again since listing
        for version_id in targets:
            with contextlib.suppress(SourceObjectGone):
                self._call(
                    "delete_object", shown, Bucket=self.bucket, Key=key, VersionId=version_id
                )
        return len(targets)

    def _versions_holding(self, key: str, etag: str) -> list[str]:
        targets = []
        for page in self._pages("list_object_versions", key):
            versions = page.get("Versions", [])
            targets += [
                v["VersionId"] for v in versions if v["Key"] == key and _etag(v["ETag"]) == etag
            ]
            if any(v["Key"] != key for v in versions):
                break
        return targets
