"""The local directory store: objects as files under a root, published atomically."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

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

_TMP_MARKER = ".tmp-"


@contextlib.contextmanager
def _io_errors(what: str) -> Iterator[None]:
    """Turn an OSError from our own file I/O into a StorageError naming the object."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{what}: {exc.strerror or type(exc).__name__}") from None


def _denied(key: str, path: Any, exc: OSError) -> ObjectAccessDenied:
    """EACCES/EPERM on an object: who owns it and who asked (a permission, not damage)."""
    try:
        st = os.stat(path)
        owner = f"owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
    except OSError:
        owner = "its directory is not accessible"
    return ObjectAccessDenied(
        f"permission denied reading object {key} ({owner}; this process runs as uid "
        f"{os.geteuid()}): {exc.strerror}"
    )


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

    def get_range(
        self,
        key: str,
        start: int = 0,
        end: int | None = None,
        *,
        expect: ObjectInfo | None = None,
    ) -> Iterator[bytes]:
        _check_range(start, end)
        f, st = self._open(key)  # f is closed by the generator below
        # The file actually opened, not the name: a rename between a check
        # and this open cannot slip another file past it.
        if expect is not None and (st.st_size, _stamp(st)) != (expect.size, expect.stamp):
            f.close()
            raise ObjectChanged(f"object {key} changed since it was last read")
        return self._iter_file(f, key, start, end)

    def read_described(self, key: str, start: int, end: int) -> tuple[bytes, ObjectInfo]:
        """The bytes and the identity of the very file they were read from (its ``fstat``)."""
        _check_range(start, end)
        f, st = self._open(key)
        with f:
            try:
                f.seek(start)
                data = f.read(end - start)
            except OSError as exc:
                raise StorageError(f"cannot read object {key}: {exc.strerror}") from None
        return data, ObjectInfo(key=key, size=st.st_size, stamp=_stamp(st))

    def _open(self, key: str) -> tuple[Any, os.stat_result]:
        """The object's file, open for reading, and its ``fstat``; typed errors otherwise."""
        path = self._path(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found") from None
        except PermissionError as exc:
            raise _denied(key, path, exc) from None
        except OSError as exc:
            raise StorageError(f"cannot read object {key}: {exc.strerror}") from None
        try:
            st = os.fstat(f.fileno())
        except OSError as exc:
            f.close()
            raise StorageError(f"cannot stat object {key}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise ObjectNotFound(f"object {key} is not a regular file")
        return f, st

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
        except PermissionError as exc:
            raise _denied(key, path, exc) from None
        except OSError as exc:
            raise StorageError(f"cannot stat object {key}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"object {key} is not a regular file")
        return ObjectInfo(key=key, size=st.st_size, stamp=_stamp(st))

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


def _stamp(st: os.stat_result) -> str:
    """What changes whenever a file's bytes may have changed (``ObjectInfo.stamp``)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"
