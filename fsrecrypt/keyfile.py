"""Secret keys kept in their own 0600 file: one loader for every such key.

Why one place: the playback URL-signing key and the audit anchor signing key
are both "256 random bits, base64, in a file only fsrecrypt may read", and a
check that drifts between two copies (one forgets ``O_NOFOLLOW``, the other the
mode check) is how a key leaks. The file is created with 0600 from its first
byte (``O_CREAT|O_EXCL`` under a temporary name, then linked into place
whole), is refused if it is a symlink, not a regular file, or readable by
group or others, and is never logged.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from fsrecrypt.errors import ConfigError

KEY_BYTES = 32
_MAX_FILE = 4096


@dataclass(frozen=True)
class KeyFileSpec:
    """How a key file is named in messages: what it is, its setting, what reading it allows."""

    what: str
    setting: str
    power: str
    created_by: str


def load_key_file(path: str, spec: KeyFileSpec, *, create: bool = True) -> bytes:
    """The key in ``path`` (base64 of at least 32 bytes), created on first use if ``create``.

    A created key is 32 random bytes, written and fsynced before it is read
    back through the same checks as an existing file.
    """
    target = Path(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except FileNotFoundError:
        if not create:
            raise ConfigError(
                f"the {spec.what} {target} does not exist",
                hint=f"Copy the key file named by {spec.setting} to this machine.",
            ) from None
        _create(target, spec)
        return load_key_file(path, spec, create=False)
    except OSError as exc:
        raise ConfigError(
            f"cannot open the {spec.what} {target}: {exc.strerror}",
            hint=f"{spec.setting} must be a regular file (not a symlink) owned by fsrecrypt.",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise ConfigError(
                f"the {spec.what} {target} is readable by group/others or not a regular file",
                hint=f"Run 'chmod 600' on it; anyone who reads it can {spec.power}.",
            )
        raw = os.read(fd, _MAX_FILE)
    finally:
        os.close(fd)
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) < KEY_BYTES:
        raise ConfigError(
            f"the {spec.what} {target} is not a base64 key of at least {KEY_BYTES} bytes",
            hint=f"Delete the file: {spec.created_by} creates a new one.",
        )
    return key


def _create(target: Path, spec: KeyFileSpec) -> None:
    """Publish a new key at ``target`` complete or not at all.

    Written to a 0600 temporary name first, fsynced, then linked into place
    (``link`` fails if another process published first: theirs is read).
    Why not O_EXCL on the name itself: a concurrent first reader (two
    uploads, or the daemon's workers, on a fresh install) would open the
    file between its creation and its write and refuse it as empty.
    """
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the {spec.what} {target}: {exc.strerror}",
            hint=f"Make the directory of {spec.setting} writable by fsrecrypt.",
        ) from None
    try:
        try:
            os.write(fd, base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return  # another process published first: read theirs
        except OSError as exc:
            raise ConfigError(
                f"cannot create the {spec.what} {target}: {exc.strerror}",
                hint=f"Make the directory of {spec.setting} writable by fsrecrypt.",
            ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
