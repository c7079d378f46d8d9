"""One ownership model: every state file belongs to the service user.

The keyring (and its directory), the local store, the URL-signing and
anchor-signing keys are created and read by the daemon running as the
service user. A CLI command run as root against that state would create
root-owned files there (a rewritten keyring, objects, a signing key) that
the daemon then cannot read. So, when the CLI runs as root (euid 0) and
the state is owned by another user, it refuses with a typed error naming
the owner and the command to run instead; ``--allow-root`` or
``FSRECRYPT_ALLOW_ROOT=1`` overrides it for recovery. Root-owned state
(a root-run installation, the tests' temporary state) is not refused.
"""

from __future__ import annotations

import os
import pwd

from fsrecrypt.config import ENV_ALLOW_ROOT as ALLOW_ROOT_ENV
from fsrecrypt.config import Config
from fsrecrypt.errors import StateOwnershipError


def state_paths(config: Config) -> list[tuple[str, str]]:
    """``(what, path)`` of every state file or directory the configuration names."""
    paths: list[tuple[str, str]] = []
    if config.keys.provider == "local" and config.keys.keyring:
        paths.append(("keyring", config.keys.keyring))
    if config.storage.backend == "local" and config.storage.path:
        paths.append(("local store", config.storage.path))
    if config.playback.signing_key_file:
        paths.append(("URL signing key", config.playback.signing_key_file))
    return paths


def _owner_of(path: str) -> tuple[str, int] | None:
    """The path's owner uid (or its nearest existing parent's: where it would be created)."""
    p = os.path.abspath(path)
    while True:
        try:
            return p, os.lstat(p).st_uid
        except FileNotFoundError:
            parent = os.path.dirname(p)
            if parent == p:
                return None
            p = parent
        except OSError:
            return None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_state_owner(config: Config, *, allow_root: bool = False, command: str = "...") -> None:
    """Refuse root against state another user owns (see the module doc)."""
    if os.geteuid() != 0 or allow_root or os.environ.get(ALLOW_ROOT_ENV) == "1":
        return
    for what, path in state_paths(config):
        found = _owner_of(path)
        if found is None:
            continue
        where, uid = found
        if uid == 0:
            continue
        owner = user_name(uid)
        shown = where if where == os.path.abspath(path) else f"{where} (where {path} lives)"
        raise StateOwnershipError(
            f"refusing to run as root: the {what} {shown} belongs to {owner!r}, and files root "
            f"creates there would be unreadable to the service",
            hint=f"Run it as that user: 'sudo -u {owner} fsrecrypt {command}'. For recovery "
            f"only, --allow-root or {ALLOW_ROOT_ENV}=1 overrides this.",
        )
