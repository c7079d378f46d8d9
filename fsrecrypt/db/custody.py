"""Chain-of-custody columns of a recording: keyed plaintext fingerprint, plaintext deletion."""

from __future__ import annotations

from typing import Any

from fsrecrypt.db.pool import Pool
from fsrecrypt.errors import NotFound


class Custody(Pool):
    """The custody columns of ``call_recordings`` (part of :class:`fsrecrypt.db.Database`)."""

    def note_plaintext_deleted(self, recording_id: str, host: str) -> None:
        """When and on which host the plaintext went (chain of custody); first deletion wins."""
        with self.transaction("noting the plaintext deletion") as cur:
            cur.execute(
                "UPDATE call_recordings SET plaintext_deleted_at = now(),"
                " plaintext_deleted_host = %s WHERE id = %s AND plaintext_deleted_at IS NULL",
                (host[:255], recording_id),
            )

    def custody_columns(self, recording_id: str) -> dict[str, Any]:
        """The custody columns of one recording (fingerprint, plaintext deletion)."""
        with self.transaction("reading a recording's custody") as cur:
            cur.execute(
                "SELECT plaintext_hmac, plaintext_hmac_key_id, plaintext_deleted_at,"
                " plaintext_deleted_host FROM call_recordings WHERE id = %s",
                (recording_id,),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"no recording with id {recording_id!r}")
        names = (
            "plaintext_hmac",
            "plaintext_hmac_key_id",
            "plaintext_deleted_at",
            "plaintext_deleted_host",
        )
        return dict(zip(names, row, strict=True))
