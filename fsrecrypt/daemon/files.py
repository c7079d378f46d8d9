"""What the daemon asks of the recordings directories before it touches a file.

Every read goes through :mod:`fsrecrypt.plaintext` (the descriptor walk that
refuses symlinks, '..' and files outside the configured directories); these
helpers only decide which names are worth handing to it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fsrecrypt.daemon.eslparse import db_safe_text
from fsrecrypt.errors import FsrecryptError
from fsrecrypt.plaintext import open_source


def wav_complete(path: str, allowed_dirs: Sequence[str] | None = None) -> bool:
    """True when ``path`` is a WAV whose RIFF and data sizes match the file on disk.

    FreeSWITCH writes a 44-byte placeholder header while recording and fixes
    the sizes when it closes the file, so consistent sizes mean "finished".
    The file is opened by the same descriptor walk as every other read
    (:func:`fsrecrypt.plaintext.open_source`) and judged by the one rule
    (:func:`fsrecrypt.plaintext.wav_state`) the pipeline applies before storing.
    """
    try:
        source = open_source(path, allowed_dirs)
    except (FsrecryptError, OSError):
        return False
    try:
        return source.wav_state == "complete"
    finally:
        source.close()


def open_by_others(roots: Sequence[str]) -> set[str]:
    """Paths under ``roots`` that some other process holds open (from /proc/*/fd).

    Processes we may not inspect (FreeSWITCH under another user without
    CAP_SYS_PTRACE) are skipped; the quiet period and the WAV header check
    still guard against adopting a file that is being written.
    """
    prefixes = tuple(str(Path(r).resolve()) + os.sep for r in roots)
    me = str(os.getpid())
    found: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(prefixes):
                found.add(target)
    return found


def path_text_problem(path: str) -> str | None:
    """Why ``path`` cannot be handled as text, or None.

    A NUL byte cannot be in a file name at all (the kernel would see a
    different, shorter path), and a name that is not UTF-8 cannot be written
    to PostgreSQL as the row's source path; both are refused up front.
    """
    if "\x00" in path:
        return "the path contains a NUL byte"
    if db_safe_text(path) != path:
        return "the path is not valid UTF-8, so it cannot be recorded in the database"
    return None
