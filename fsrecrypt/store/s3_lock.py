"""S3 Object Lock for recordings: retention on every new object, legal holds, lock state.

Kept beside :class:`~fsrecrypt.store.s3.S3Store` (which mixes it in) because
it is a responsibility of its own: with ``[storage] object_lock`` the bucket,
not fsrecrypt, is what refuses to delete a recording inside its retention.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fsrecrypt.store.base import LockState


class S3ObjectLock:
    """Object Lock requests; the host class provides ``_call`` and the settings."""

    object_lock: str
    retention_days: int
    _call: Callable[..., dict[str, Any]]

    def _lock_args(self) -> dict[str, Any]:
        """Object Lock retention for a new object: retain-until = its creation + retention days.

        The object is created a few seconds after its database row, so the
        storage's retention never ends before fsrecrypt's own.
        """
        if not self.object_lock or self.retention_days <= 0:
            return {}
        # Rounded up to a whole second: S3 keeps retain-until dates in seconds.
        until = (datetime.now(UTC) + timedelta(days=self.retention_days)).replace(microsecond=0)
        until += timedelta(seconds=1)
        return {"ObjectLockMode": self.object_lock.upper(), "ObjectLockRetainUntilDate": until}

    def _version_ids(self, key: str, *, markers: bool = True) -> list[str]:
        """Every version (and, if ``markers``, delete marker) of exactly ``key``."""
        found: list[str] = []
        kwargs: dict[str, Any] = {"Prefix": key}
        while True:
            resp = self._call("list_object_versions", key, **kwargs)
            entries = [*resp.get("Versions", [])]
            if markers:
                entries += resp.get("DeleteMarkers", [])
            found += [str(e.get("VersionId", "null")) for e in entries if e.get("Key") == key]
            if not resp.get("IsTruncated"):
                return found
            kwargs = {
                "Prefix": key,
                "KeyMarker": resp.get("NextKeyMarker"),
                "VersionIdMarker": resp.get("NextVersionIdMarker"),
            }

    def lock_state(self, key: str) -> LockState:
        """Object Lock retention and legal hold of the newest version of ``key``."""
        if not self.object_lock:
            return LockState()
        resp = self._call("head_object", key, Key=key)
        until = resp.get("ObjectLockRetainUntilDate")
        return LockState(
            mode=str(resp.get("ObjectLockMode") or "").lower(),
            retain_until=until if isinstance(until, datetime) else None,
            legal_hold=resp.get("ObjectLockLegalHoldStatus") == "ON",
        )

    def set_legal_hold(self, key: str, on: bool) -> int:
        """An S3 Object Lock legal hold on (or off) every version of ``key``."""
        if not self.object_lock:
            return 0
        versions = self._version_ids(key, markers=False)
        for version in versions:
            self._call(
                "put_object_legal_hold",
                key,
                Key=key,
                VersionId=version,
                LegalHold={"Status": "ON" if on else "OFF"},
            )
        return len(versions)
