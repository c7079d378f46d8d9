"""Where the command line writes plaintext: all at once or not at all, even when killed.

``atomic_output`` is what ``get``, ``decrypt`` and ``audit export`` write
through: an unnamed O_TMPFILE file linked into place once complete (a named
hidden file renamed into place where the filesystem cannot), removed on
SIGTERM/SIGHUP/SIGINT. ``open_input`` opens a file named on the command line
with a typed error. Standard library only, so importing it costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fsrecrypt.errors import InputFileError

STDOUT = "-"
"""An output path of ``-`` means standard output (``get -o -``, ``decrypt IN -``)."""

_CLEANUP_SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")


@contextlib.contextmanager
def removed_on_signal() -> Iterator[set[str]]:
    """Names put in the yielded set are unlinked if SIGTERM, SIGHUP or SIGINT arrives.

    Why: a ``get`` or ``decrypt`` killed mid-write must not leave a readable
    file of partial plaintext. The handler unlinks the pending names, puts
    the previous handlers back and lets the signal take its usual course
    (the process ends by it, so its exit status names it; SIGINT still
    raises KeyboardInterrupt). A signal set to be ignored (``nohup``) stays
    ignored. Signal handlers can only be installed from the main thread;
    elsewhere only the ordinary failure cleanup applies.
    """
    import signal
    import threading

    pending: set[str] = set()
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous: dict[int, Any] = {}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        previous.clear()

    def on_signal(signum: int, frame: Any) -> None:
        for name in list(pending):
            with contextlib.suppress(OSError):
                os.unlink(name)
        pending.clear()
        before = previous.get(signum, signal.SIG_DFL)
        restore()
        if callable(before):
            before(signum, frame)
        else:
            os.kill(os.getpid(), signum)

    for name in _CLEANUP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN or current is None:
            continue
        previous[signum] = current
        signal.signal(signum, on_signal)
    try:
        yield pending
    finally:
        restore()


def _open_unnamed(directory: Path, mode: int) -> int | None:
    """An unnamed file (O_TMPFILE) in ``directory``, or None where that is not possible.

    An unnamed file has no name until it is linked into place, so even a
    SIGKILL (or a crash) mid-write leaves nothing readable behind. It needs
    kernel and filesystem support, and /proc to link it by descriptor.
    """
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        fd = os.open(directory, flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError:
        # EOPNOTSUPP (filesystem), EISDIR/EINVAL (kernel) and real errors alike:
        # the named fallback reports a real error with its own message.
        return None
    if not os.path.exists(f"/proc/self/fd/{fd}"):
        os.close(fd)
        return None
    return fd


def _link_into_place(fd: int, target: Path, directory: Path, pending: set[str]) -> None:
    """Give the finished unnamed file ``fd`` the name ``target``.

    linkat(2) with AT_SYMLINK_FOLLOW on /proc/self/fd/N, the documented way
    for O_TMPFILE files (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
    os.link calls linkat only when given a directory descriptor (plain
    link(2) would try to link the /proc symlink itself), hence ``dir_fd``.
    link never replaces a name, so an existing ``target`` is replaced as
    before: via a hidden name beside it and an atomic rename, that name
    removed on a signal.
    """
    source = f"/proc/self/fd/{fd}"
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputFileError(f"cannot write in {directory}: {exc.strerror}") from None
    try:
        link = functools.partial(
            os.link, source, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=True
        )
        try:
            link(target.name)
            return
        except FileExistsError:
            pass
        except OSError as exc:
            raise InputFileError(f"cannot create {target}: {exc.strerror}") from None
        import secrets

        while True:
            name = f".{target.name}.{secrets.token_hex(6)}.part"
            tmp = str(directory / name)
            pending.add(tmp)
            try:
                link(name)
                break
            except FileExistsError:
                pending.discard(tmp)
            except OSError as exc:
                pending.discard(tmp)
                raise InputFileError(f"cannot create {target}: {exc.strerror}") from None
        try:
            os.replace(name, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            raise InputFileError(f"cannot replace {target}: {exc.strerror}") from None
        finally:
            pending.discard(tmp)
    finally:
        os.close(dir_fd)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str, mode: int = 0o600) -> Iterator[IO[bytes]]:
    """Write ``path`` all at once: it appears complete or not at all.

    A failed or interrupted decrypt must never leave partial plaintext
    behind. Where the filesystem allows, the bytes go to an unnamed file
    (O_TMPFILE, ``mode``) linked into place only once complete and synced,
    so nothing has a name even if the process is SIGKILLed. Elsewhere a
    hidden temp file (mode ``mode``) beside ``path`` is renamed into place,
    and removed on any failure and on SIGTERM, SIGHUP and SIGINT. An
    existing ``path`` is replaced only by a complete output, never touched
    by a failed one. ``-`` writes to standard output.
    """
    if path == STDOUT:
        stream = sys.stdout.buffer
        yield stream
        stream.flush()
        return
    target = Path(path)
    directory = target.parent
    with removed_on_signal() as pending:
        fd = _open_unnamed(directory, mode)
        tmp: str | None = None
        if fd is None:
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=directory)
            except OSError as exc:
                raise InputFileError(f"cannot write in {directory}: {exc.strerror}") from None
            pending.add(tmp)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
                if tmp is None:
                    _link_into_place(out.fileno(), target, directory, pending)
            if tmp is not None:
                os.replace(tmp, target)
                pending.discard(tmp)
                tmp = None
            _fsync_directory(directory)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                pending.discard(tmp)
            raise


def open_input(path: str) -> IO[bytes]:
    """``path`` opened for binary reading; an unreadable file is an ``InputFileError``."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror}") from None
