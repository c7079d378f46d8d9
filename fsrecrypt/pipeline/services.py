"""The adapters one job needs (database, keys, store), built on first use; worker ids.

The adapter packages are imported here, at the top; what stays deferred is
what each *configuration* needs: ``build_key_provider`` loads boto3 only for
KMS and ``build_store`` only for S3. The pipeline is never imported on the
light paths (``fsrecrypt --help``, a local ``encrypt``/``decrypt``).
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field

from fsrecrypt.config import Config
from fsrecrypt.db import Database
from fsrecrypt.keys import KeyProvider, build_key_provider
from fsrecrypt.keys.escrow import EscrowKeys
from fsrecrypt.pipeline.custody import FingerprintKey
from fsrecrypt.pipeline.headers import HeaderCache
from fsrecrypt.store import ObjectStore, build_store


@dataclass
class Services:
    """Config plus lazily built adapters, so a command pays only for what it uses."""

    config: Config
    _db: Database | None = field(default=None, repr=False)
    _keys: KeyProvider | None = field(default=None, repr=False)
    _store: ObjectStore | None = field(default=None, repr=False)
    headers: HeaderCache = field(default_factory=HeaderCache, repr=False)
    _escrow: EscrowKeys | None = field(default=None, repr=False)
    _fingerprint_key: FingerprintKey | None = field(default=None, repr=False)

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(
                self.config.database.dsn,
                # + heartbeat, housekeeping and a streaming cursor beside the work loops
                max_connections=max(
                    4, self.config.pipeline.concurrency + 2, self.config.jobs.concurrency + 3
                ),
                connect_timeout=self.config.database.connect_timeout,
            )
        return self._db

    @property
    def keys(self) -> KeyProvider:
        if self._keys is None:
            self._keys = build_key_provider(self.config.keys, branch_key_kms=self._branch_key_kms)
        return self._keys

    def _branch_key_kms(self, branch_key_id: str) -> str | None:
        """The KMS key a hierarchy branch key was moved to (asked once per cache TTL)."""
        return self.db.branch_key_kms(branch_key_id)

    @property
    def escrow(self) -> EscrowKeys:
        """A tenant's escrow keys (KMS in any region, raw AES in the escrow keyring)."""
        if self._escrow is None:
            self._escrow = EscrowKeys(self.config.keys)
        return self._escrow

    @property
    def fingerprint_key(self) -> FingerprintKey:
        """The custody fingerprint key, read from its file once per process (created if
        missing): every stored recording is fingerprinted with it."""
        if self._fingerprint_key is None:
            self._fingerprint_key = FingerprintKey.from_config(self.config)
        return self._fingerprint_key

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = build_store(
                self.config.storage, retention_days=self.config.retention.days
            )
        return self._store

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def worker_id(prefix: str | None = None) -> str:
    """Who holds a claim: host and pid, so a restarted daemon can drop its own stale leases."""
    return f"{prefix or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def host_worker_prefix() -> str:
    return f"{socket.gethostname()}:"
