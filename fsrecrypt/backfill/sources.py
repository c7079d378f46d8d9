"""The backfill's sources as a stream of items: a directory tree, or an S3 prefix.

Why a stream: an archive holds millions of files, and the listing must never
hold them all (a job's items are created from this iterator as it goes). The
directory walk is depth-first over directory descriptors (one open
descriptor per level, never a list of a directory's names), opens every
level relative to its parent with ``O_NOFOLLOW`` and never follows a
symbolic link; what it cannot or must not take is still yielded, as an item
that carries the reason it is skipped, so the report names it.

S3 listing lives in :mod:`fsrecrypt.backfill.s3source` (boto3 at its top),
loaded by :func:`iter_source` only for an ``s3://`` source.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from fsrecrypt.backfill.naming import Naming, SourceSpec
from fsrecrypt.errors import InputFileError
from fsrecrypt.plaintext import fingerprint_of

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class SourceObjectChanged(InputFileError):
    """The object is no longer the one listed (another ETag now): nothing was deleted."""

    hint = "Run the backfill again: the new content is listed and stored then."
    transient = False


class SourceObjectGone(InputFileError):
    """The listed object (or version) no longer exists."""

    transient = False


@dataclass(frozen=True)
class SourceItem:
    """One file or object to store, as it was listed (JSON-able: a job item's payload).

    ``locator``: the absolute path, or the object key. ``root``: the listed
    directory (as resolved), or the bucket. ``name``: below the source (what
    ``--tenant-from``/``--call-uuid-from`` were matched against).
    ``identity``: what must still hold when it is read (a file's device,
    inode, size and mtime; an object's ETag). ``skip``: why it is not
    stored, decided from the listing alone (symbolic link, odd name, ...).
    """

    kind: str
    root: str
    locator: str
    name: str
    size: int = 0
    identity: str = ""
    version_id: str | None = None
    latest: bool = True
    versions: list[str] | None = None
    tenant: str | None = None
    call_uuid: str | None = None
    skip: str | None = None

    @property
    def shown(self) -> str:
        """How reports name it (s3://bucket/key or the path), non-printables escaped."""
        where = f"s3://{self.root}/{self.locator}" if self.kind == "s3" else self.locator
        return _escaped(where)

    def payload(self) -> dict[str, Any]:
        """The item as JSON-able values (a skipped item's unusable name escaped, so it fits
        PostgreSQL's jsonb, which refuses NUL and lone surrogates)."""
        data = asdict(self)
        if self.skip is not None:
            data["locator"], data["name"] = _escaped(self.locator), _escaped(self.name)
        return data

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> SourceItem:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})


def _escaped(text: str) -> str:
    """``text`` with NUL and undecodable bytes written as escapes (for reports only)."""
    if _name_problem(text) is None:
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.replace(b"\0", b"\\x00").decode("utf-8", "backslashreplace")


def _name_problem(name: str) -> str | None:
    """Why a listed name cannot be stored faithfully (None if it can)."""
    if "\0" in name:
        return "the name contains a NUL character"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8"
    return None


def named_item(
    kind: str, root: str, locator: str, name: str, naming: Naming, **kw: Any
) -> SourceItem:
    """An item with its tenant and call taken from ``name`` (or the reason it is skipped)."""
    problem = kw.pop("skip", None) or _name_problem(name)
    if problem is not None:
        return SourceItem(kind, root, locator, name, skip=problem, **kw)
    tenant = naming.tenant_for(name)
    if tenant is None:
        problem = "--tenant-from found no tenant in the name"
    return SourceItem(
        kind,
        root,
        locator,
        name,
        tenant=tenant,
        call_uuid=naming.call_uuid_for(name),
        skip=problem,
        **kw,
    )


def iter_directory(root: str, naming: Naming) -> Iterator[SourceItem]:
    """Every entry below ``root``: regular files to store, the rest as skipped items."""
    real = os.path.realpath(root)
    top = os.open(real, _DIR_FLAGS)
    stack: list[tuple[int, Iterator[os.DirEntry[str]], str]] = [(top, os.scandir(top), "")]
    try:
        while stack:
            fd, entries, rel = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                entries.close()  # type: ignore[attr-defined]
                os.close(fd)
                continue
            name = f"{rel}/{entry.name}" if rel else entry.name
            path = f"{real}/{name}"
            skip = None
            if entry.name.startswith("."):
                skip = "hidden name (not listed)"
            else:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    st, skip = None, f"cannot stat it ({exc.strerror})"
                if st is not None and stat.S_ISDIR(st.st_mode):
                    if _name_problem(name) is None:
                        try:
                            sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                        except OSError as exc:
                            skip = f"cannot open the directory ({exc.strerror})"
                        else:
                            stack.append((sub, os.scandir(sub), name))
                            continue
                    else:
                        skip = f"directory not listed: {_name_problem(name)}"
                elif st is not None and stat.S_ISLNK(st.st_mode):
                    skip = "symbolic link (not followed)"
                elif st is not None and not stat.S_ISREG(st.st_mode):
                    skip = "not a regular file"
                elif st is not None:
                    yield named_item(
                        "dir",
                        real,
                        path,
                        name,
                        naming,
                        size=st.st_size,
                        identity=fingerprint_of(st),
                    )
                    continue
            yield SourceItem("dir", real, path, name, skip=skip)
    finally:
        for fd, entries, _rel in stack:
            entries.close()  # type: ignore[attr-defined]
            os.close(fd)


@dataclass(frozen=True)
class S3Options:
    """Where an ``s3://`` source is (``--source-endpoint-url``, ``--source-region``)."""

    endpoint_url: str | None = None
    region: str | None = None


def iter_source(
    spec: SourceSpec, naming: Naming, s3: S3Options | None = None
) -> Iterator[SourceItem]:
    """The items of one SOURCE, streamed."""
    if spec.kind == "dir":
        yield from iter_directory(spec.root, naming)
        return
    from fsrecrypt.backfill.s3source import S3Source

    source = S3Source(spec.bucket, (s3 or S3Options()).endpoint_url, (s3 or S3Options()).region)
    for obj in source.iter_versions(spec.prefix):
        name = obj.key[len(spec.prefix) :].lstrip("/") or posixpath.basename(obj.key)
        yield named_item(
            "s3",
            spec.bucket,
            obj.key,
            name,
            naming,
            size=obj.size,
            identity=obj.etag,
            version_id=obj.version_id,
            latest=obj.latest,
            versions=obj.versions,
        )
