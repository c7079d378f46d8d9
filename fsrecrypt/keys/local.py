"""``LocalKeyring``: the embedded default, AES-256 wrapping keys in a 0600 JSON file.

Its EDKs use the ESDK raw-AES layout (the same bytes the official SDK's
``RawMasterKey`` with ``AES_256_GCM_IV12_TAG16_NO_PADDING`` writes), so any
ESDK configured with provider id ``fsrecrypt-local`` and the same key can
open our recordings without fsrecrypt.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import stat
import struct
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fsrecrypt.errors import (
    KeyAccessError,
    KeyExists,
    KeyNotFound,
    KeyringPermissionError,
    NoUsableDataKey,
)
from fsrecrypt.format import EncryptedDataKey, serialize_context
from fsrecrypt.keys.base import (
    DATA_KEY_BYTES,
    LOCAL_PROVIDER_ID,
    DataKey,
    DataKeyAuthenticationFailed,
    KeyInfo,
    KeyProvider,
    validate_key_id,
)

_TAG_BITS = 128
_IV_BYTES = 12
# provider_info suffix after the key name: u32 tag bits, u32 IV length, IV.
_RAW_INFO_SUFFIX = 4 + 4 + _IV_BYTES
_WRAPPED_BYTES = DATA_KEY_BYTES + _TAG_BITS // 8


def _aad(context: Mapping[str, str]) -> bytes:
    # The ESDK's raw keyring authenticates the context serialization without
    # its outer length; an empty context is the empty string (not b"\0\0").
    return serialize_context(context) if context else b""


def _raw_provider_info(key_id: str, iv: bytes) -> bytes:
    return key_id.encode("utf-8") + struct.pack(">II", _TAG_BITS, _IV_BYTES) + iv


def _parse_raw_provider_info(info: bytes) -> tuple[str, bytes] | None:
    """(key id, IV) from a raw-AES provider info, or None if it is not that layout."""
    if len(info) <= _RAW_INFO_SUFFIX:
        return None
    name, suffix = info[:-_RAW_INFO_SUFFIX], info[-_RAW_INFO_SUFFIX:]
    tag_bits, iv_len = struct.unpack(">II", suffix[:8])
    if tag_bits != _TAG_BITS or iv_len != _IV_BYTES:
        return None
    try:
        key_id = name.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return key_id, suffix[8:]


@dataclass(frozen=True)
class _Snapshot:
    """A parsed keyring file plus the stat fields that tell us it changed."""

    signature: tuple[int, int, int, int]
    keys: dict[str, tuple[bytes, str | None]] = field(repr=False)


class LocalKeyring(KeyProvider):
    """AES-256 wrapping keys in a 0600 JSON file.

    File layout: ``{"keys": {"<id>": {"material": "<base64, 32 bytes>",
    "created_at": "<ISO 8601>"}}}``. The file is re-read when it changes
    (stat signature), so keys created by ``fsrecrypt keys create`` in another
    process are seen by a running daemon without a restart.

    Why so strict about the file: it is the root of every recording's
    confidentiality. A keyring that group/others can read, a symlink (which
    could be swapped to point elsewhere) or a non-regular file is refused
    rather than used.
    """

    name = "local"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._snapshot: _Snapshot | None = None
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalKeyring({str(self.path)!r})"

    # -- file handling ------------------------------------------------------------

    def _check_stat(self, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise KeyringPermissionError(f"keyring {self.path} is a symlink; refusing to use it")
        if not stat.S_ISREG(st.st_mode):
            raise KeyringPermissionError(f"keyring {self.path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyringPermissionError(
                f"keyring {self.path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                "group/others must have no access"
            )

    def _read(self) -> _Snapshot | None:
        """The current keyring (None if the file does not exist), re-read if it changed."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyAccessError(f"cannot stat keyring {self.path}: {exc.strerror}") from None
        self._check_stat(st)
        sig = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._mutex:
            snap = self._snapshot
            if snap is not None and snap.signature == sig:
                return snap
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == getattr(os, "ELOOP", 40):  # raced into a symlink
                raise KeyringPermissionError(
                    f"keyring {self.path} is a symlink; refusing to use it"
                ) from None
            raise KeyAccessError(f"cannot open keyring {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())
            self._check_stat(fst)  # the file we opened, not just the name we stat'ed
            raw = f.read()
        keys = self._parse(raw)
        snap = _Snapshot((fst.st_dev, fst.st_ino, fst.st_mtime_ns, fst.st_size), keys)
        with self._mutex:
            self._snapshot = snap
        return snap

    def _parse(self, raw: bytes) -> dict[str, tuple[bytes, str | None]]:
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            # The decoder's message could quote a fragment of the file: drop it.
            raise KeyAccessError(
                f"keyring {self.path} is not valid JSON",
                hint="Restore the keyring from its backup.",
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys", {}), dict):
            raise KeyAccessError(f"keyring {self.path}: expected an object with a 'keys' object")
        keys: dict[str, tuple[bytes, str | None]] = {}
        for key_id, entry in doc.get("keys", {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("material"), str):
                raise KeyAccessError(f"keyring {self.path}: key {key_id!r} has no material")
            try:
                material = base64.b64decode(entry["material"], validate=True)
            except (binascii.Error, ValueError):
                raise KeyAccessError(
                    f"keyring {self.path}: key {key_id!r} material is not base64"
                ) from None
            if len(material) != DATA_KEY_BYTES:
                raise KeyAccessError(
                    f"keyring {self.path}: key {key_id!r} material is not 32 bytes"
                )
            created = entry.get("created_at")
            keys[key_id] = (material, created if isinstance(created, str) else None)
        return keys

    def _material(self, key_id: str) -> bytes:
        snap = self._read()
        if snap is None or key_id not in snap.keys:
            raise KeyNotFound(f"key {key_id!r} is not in keyring {self.path}")
        return snap.keys[key_id][0]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize writers across processes.

        The lock is a separate file because the keyring itself is replaced by
        rename: a lock held on the old inode would not stop a second writer
        that opened the new one.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_atomic(self, doc: dict[str, Any]) -> None:
        """Write the whole keyring via temp file + fsync + rename + directory fsync.

        A crash leaves either the old or the new keyring, never a torn one, and
        the temp file is 0600 from its first byte (mkstemp).
        """
        data = json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- KeyProvider --------------------------------------------------------------

    def _wrap(self, key_id: str, data_key: bytes, context: Mapping[str, str]) -> EncryptedDataKey:
        material = self._material(key_id)
        iv = os.urandom(_IV_BYTES)
        ciphertext = AESGCM(material).encrypt(iv, data_key, _aad(context))
        return EncryptedDataKey(
            provider_id=LOCAL_PROVIDER_ID,
            provider_info=_raw_provider_info(key_id, iv),
            ciphertext=ciphertext,
        )

    def wrap_data_key(
        self, key_id: str, data_key: bytes, context: Mapping[str, str]
    ) -> EncryptedDataKey:
        """``data_key`` (generated elsewhere) wrapped by ``key_id`` (escrow copies)."""
        validate_key_id(key_id)
        if len(data_key) != DATA_KEY_BYTES:
            raise ValueError("a data key must be 32 bytes")
        return self._wrap(key_id, data_key, context)

    def generate_data_key(self, key_id: str, context: Mapping[str, str]) -> DataKey:
        validate_key_id(key_id)
        data_key = os.urandom(DATA_KEY_BYTES)
        return DataKey(
            plaintext=data_key, encrypted=self._wrap(key_id, data_key, context), key_id=key_id
        )

    def decrypt_data_key(
        self, edks: Sequence[EncryptedDataKey], context: Mapping[str, str]
    ) -> bytes:
        snap = self._read()
        held = snap.keys if snap is not None else {}
        seen: list[str] = []
        failed: list[str] = []
        aad = _aad(context)
        for edk in edks:
            if edk.provider_id != LOCAL_PROVIDER_ID:
                continue
            parsed = _parse_raw_provider_info(edk.provider_info)
            if parsed is None:
                continue
            key_id, iv = parsed
            seen.append(key_id)
            if key_id not in held or len(edk.ciphertext) != _WRAPPED_BYTES:
                continue
            try:
                data_key = AESGCM(held[key_id][0]).decrypt(iv, edk.ciphertext, aad)
            except InvalidTag:
                failed.append(key_id)
                continue
            return data_key
        if failed:
            raise DataKeyAuthenticationFailed(
                f"data key wrapped by local key {failed[0]!r} did not authenticate "
                "(wrong encryption context or altered header)"
            )
        if seen:
            raise NoUsableDataKey(
                f"keyring {self.path} holds none of the wrapping keys "
                f"{', '.join(repr(k) for k in seen)}"
            )
        raise NoUsableDataKey("no encrypted data key from the local keyring in this message")

    def rewrap(
        self, edk: EncryptedDataKey, context: Mapping[str, str], new_key_id: str
    ) -> EncryptedDataKey:
        validate_key_id(new_key_id)
        self._material(new_key_id)  # fail before unwrapping if the target is missing
        data_key = self.decrypt_data_key([edk], context)
        return self._wrap(new_key_id, data_key, context)

    def create_key(self, key_id: str) -> str:
        validate_key_id(key_id)
        with self._locked():
            snap = self._read()  # re-read under the lock: another process may have added keys
            if snap is not None and key_id in snap.keys:
                raise KeyExists(f"key {key_id!r} already exists in keyring {self.path}")
            entries: dict[str, dict[str, str]] = {}
            if snap is not None:
                for kid, (material, created) in snap.keys.items():
                    entry = {"material": base64.b64encode(material).decode("ascii")}
                    if created is not None:
                        entry["created_at"] = created
                    entries[kid] = entry
            entries[key_id] = {
                "material": base64.b64encode(os.urandom(DATA_KEY_BYTES)).decode("ascii"),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            self._write_atomic({"keys": entries})
        return key_id

    def list_keys(self) -> list[KeyInfo]:
        snap = self._read()
        if snap is None:
            return []
        return [KeyInfo(key_id=k, created_at=c) for k, (_m, c) in sorted(snap.keys.items())]

    def check_key(self, key_id: str) -> None:
        validate_key_id(key_id)
        self._material(key_id)

    def key_for_edk(self, edk: EncryptedDataKey) -> str | None:
        if edk.provider_id != LOCAL_PROVIDER_ID:
            return None
        parsed = _parse_raw_provider_info(edk.provider_info)
        return parsed[0] if parsed else None
