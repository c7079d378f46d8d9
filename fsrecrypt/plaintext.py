"""The plaintext recordings on disk: opened, checked and deleted only through descriptors.

This is the one module that touches a recording's plaintext file. It knows
nothing of keys, stores or the database (``tests/test_layout.py`` checks):
``open_source`` hands the pipeline an opened, vetted :class:`SourceFile`, and
``delete_plaintext`` removes it only if the name still points at the very
file that was stored, unchanged. ``wav_state`` tells a finished WAV from one
FreeSWITCH is still writing.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fsrecrypt.errors import InputFileError, PathRefused, PathUnreadable

HEAD_BYTES = 4096
"""Bytes of a file's start read when it is opened: a WAV's header (``wav_state``, ``wav_info``)."""

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

# A permission, not a forgery: refused as "unreadable" (PathUnreadable), not "path".
_DENIED = (errno.EACCES, errno.EPERM)
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


def iter_recording_files(
    roots: Sequence[str], on_error: Callable[[OSError], None] | None = None
) -> Iterator[tuple[str, os.stat_result]]:
    """Regular, non-hidden files below the recordings directories (symlinks not followed).

    Names and ``lstat`` only: no file is opened. The daemon's sweep and
    ``fsrecrypt recordings pending`` walk the directories the same way.

    ``on_error`` hears of each directory that could not be listed (e.g. an
    unreadable one), which would otherwise be skipped silently.
    """
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield path, st


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
                if exc.errno in _DENIED:
                    raise PathUnreadable(
                        f"cannot read {shown}: a directory on its path is not accessible "
                        f"to this process ({exc.strerror})"
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
            if exc.errno in _DENIED:
                raise PathUnreadable(
                    f"cannot read {path}: permission denied ({exc.strerror})"
                ) from None
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
            head = os.pread(fd, HEAD_BYTES, 0)
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
        if exc.errno in _DENIED:
            raise PathUnreadable(f"cannot stat {path!r}: permission denied") from None
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
    _fsync_cooperatively(dir_fd)
    return True


def _fsync_cooperatively(fd: int) -> None:
    """``os.fsync``, on gevent's thread pool when this is a gevent process (the daemon).

    Why: gevent cannot make fsync cooperative. Called on the daemon's one
    thread it stopped every other recording, the Event Socket reader and the
    liveness probe for as long as the disk took (5% of the daemon's time in
    a burst on an idle disk; far longer on a busy one). The calling greenlet
    still waits for it, so the deletion is durable before it is reported.
    """
    # Only a process that loaded and applied gevent takes this path, so it is
    # looked up, never imported here (the light commands never load gevent).
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        sys.modules["gevent.hub"].get_hub().threadpool.apply(os.fsync, (fd,))
    else:
        os.fsync(fd)


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
