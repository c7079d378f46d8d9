"""Write-once homes for audit anchors: an append-only directory, an S3 Object Lock bucket.

An anchor is small signed JSON naming the head of every audit chain. Its
value is that nobody who can write the database can change it afterwards, so
each sink only ever creates: anchor ``N`` is the file or object
``NNNNNNNNNNNN.json``, created with ``O_EXCL`` (or S3 ``If-None-Match: *``)
and never rewritten. Reading back returns what was first written: in a
versioned Object Lock bucket the oldest version of each key, so an
overwrite (impossible with If-None-Match, but a governance-bypass principal
could try) cannot replace an anchor, only add a version that is reported.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from fsrecrypt.errors import ObjectExists, StorageError
from fsrecrypt.store.s3 import S3Store

ANCHOR_NAME = re.compile(r"^([0-9]{12})\.json\Z")
MAX_ANCHOR_BYTES = 4 * 1024 * 1024
"""An anchor names every tenant's head (~200 bytes each); a bigger file is not ours."""


@dataclass(frozen=True)
class StoredAnchor:
    """One anchor as read back: its sequence number, bytes, where, and anything odd."""

    seq: int
    data: bytes
    location: str
    notes: tuple[str, ...] = ()


class AnchorSink(Protocol):
    """Somewhere anchors are created and never changed."""

    location: str

    def write(self, seq: int, data: bytes) -> str:
        """Create anchor ``seq``; ``ObjectExists`` if it already exists. Returns where."""

    def latest(self) -> StoredAnchor | None:
        """The anchor with the highest sequence number, or None."""

    def read_all(self) -> list[StoredAnchor]:
        """Every anchor, by sequence number."""


def anchor_name(seq: int) -> str:
    if not 0 < seq < 10**12:
        raise StorageError(f"anchor sequence number {seq} is out of range")
    return f"{seq:012d}.json"


class LocalAnchorDir:
    """Anchors as files in one directory: created ``O_EXCL``, fsynced with the directory.

    The files are made read-only (0444); the directory should be append-only
    for the service user (``chattr +a``) or on WORM storage, which is what
    makes it write-once against root. fsrecrypt itself never opens an
    existing anchor for writing.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.location = str(self.path)

    def __repr__(self) -> str:
        return f"LocalAnchorDir({self.location!r})"

    def write(self, seq: int, data: bytes) -> str:
        name = anchor_name(seq)
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(
                self.path / name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o444,
            )
        except FileExistsError:
            raise ObjectExists(f"anchor {name} already exists in {self.location}") from None
        except OSError as exc:
            raise StorageError(
                f"cannot create anchor {name} in {self.location}: {exc.strerror}",
                hint="Make [audit] anchor_dir writable (append) by the fsrecrypt user.",
            ) from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return str(self.path / name)

    def _seqs(self) -> list[int]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list anchors in {self.location}: {exc.strerror}") from None
        return sorted(int(m.group(1)) for n in names if (m := ANCHOR_NAME.match(n)))

    def _read(self, seq: int) -> StoredAnchor:
        name = anchor_name(seq)
        try:
            fd = os.open(self.path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"cannot read anchor {name}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(f"anchor {name} in {self.location} is not a regular file")
            data = os.read(fd, MAX_ANCHOR_BYTES + 1)
        finally:
            os.close(fd)
        return StoredAnchor(seq, data, str(self.path / name))

    def latest(self) -> StoredAnchor | None:
        seqs = self._seqs()
        return self._read(seqs[-1]) if seqs else None

    def read_all(self) -> list[StoredAnchor]:
        """Every anchor; one that cannot be read (a symlink, a directory) is returned empty
        with a note, so verification names it instead of stopping at it."""
        found = []
        for seq in self._seqs():
            try:
                found.append(self._read(seq))
            except StorageError as exc:
                found.append(
                    StoredAnchor(seq, b"", str(self.path / anchor_name(seq)), (exc.message,))
                )
        return found


class S3AnchorBucket:
    """Anchors as objects in an S3 bucket with Object Lock (retention set on every put)."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str,
        retention_days: int,
        mode: str,
        region: str,
        endpoint_url: str | None,
    ) -> None:
        self._s3 = S3Store(bucket, prefix="", region=region, endpoint_url=endpoint_url)
        self.bucket = bucket
        self.prefix = prefix
        self.retention_days = retention_days
        self.mode = mode.upper()
        self.location = f"s3://{bucket}/{prefix}"

    def __repr__(self) -> str:
        return f"S3AnchorBucket({self.location!r})"

    def write(self, seq: int, data: bytes) -> str:
        import base64
        import hashlib

        key = self.prefix + anchor_name(seq)
        retain = datetime.now(UTC) + timedelta(days=self.retention_days)
        self._s3._call(
            "put_object",
            key,
            Key=key,
            Body=data,
            ContentType="application/json",
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode("ascii"),
            IfNoneMatch="*",
            ObjectLockMode=self.mode,
            ObjectLockRetainUntilDate=retain,
        )
        return f"s3://{self.bucket}/{key}"

    def _versions(self) -> dict[int, list[dict[str, Any]]]:
        """Every version of every anchor key, oldest first per key."""
        found: dict[int, list[dict[str, Any]]] = {}
        kwargs: dict[str, Any] = {"Prefix": self.prefix}
        while True:
            page = self._s3._call("list_object_versions", self.prefix, **kwargs)
            for version in page.get("Versions", []):
                match = ANCHOR_NAME.match(str(version["Key"])[len(self.prefix) :])
                if match:
                    found.setdefault(int(match.group(1)), []).append(version)
            if not page.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["VersionIdMarker"] = page.get("NextVersionIdMarker")
        for versions in found.values():
            versions.sort(key=lambda v: v["LastModified"])
        return found

    def _read(self, seq: int, versions: list[dict[str, Any]]) -> StoredAnchor:
        first = versions[0]
        key = str(first["Key"])
        resp = self._s3._call("get_object", key, Key=key, VersionId=first["VersionId"])
        data = resp["Body"].read(MAX_ANCHOR_BYTES + 1)
        notes = ()
        if len(versions) > 1:
            notes = (
                f"{len(versions) - 1} later version(s) of this anchor exist; the first is used",
            )
        return StoredAnchor(seq, data, f"s3://{self.bucket}/{key}", notes)

    def latest(self) -> StoredAnchor | None:
        found = self._versions()
        if not found:
            return None
        seq = max(found)
        return self._read(seq, found[seq])

    def read_all(self) -> list[StoredAnchor]:
        found = self._versions()
        return [self._read(seq, found[seq]) for seq in sorted(found)]
