"""Chain-of-custody columns of a recording: keyed plaintext fingerprint, plaintext deletion."""

from __future__ import annotations

from typing import Any

from fsrecrypt.db.pool import Pool
from fsrecrypt.errors import NotFound


class Custody(Pool):
    """The custody columns of ``call_recordings`` (part of :class:`fsrecrypt.db.Database`)."""

    def note_plaintext_deleted(self, recording_id: str, host: str) -> None:
        """When and on which host the plaintext went (chain of custody); first deletion wins."""
        with self.statement("noting the plaintext deletion") as cur:  # one UPDATE: autocommit
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
                " plaintext_deleted_host, plaintext_hmac_source, plaintext_hmac_at"
                " FROM call_recordings WHERE id = %s",
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
            "plaintext_hmac_source",
            "plaintext_hmac_at",
        )
        return dict(zip(names, row, strict=True))

    def unfingerprinted(
        self, *, after_id: str | None, tenant_id: str | None, limit: int | None
    ) -> list[str]:
        """Ids of stored recordings with no fingerprint, in id order after ``after_id``.

        ``limit=None`` counts them instead (one-element list holding the count).
        """
        clauses = ["plaintext_hmac IS NULL", "status = 'stored'"]
        params: list[Any] = []
        if after_id is not None:
            clauses.append("id > %s")
            params.append(after_id)
        if tenant_id is not None:
            clauses.append("tenant_id = %s")
            params.append(tenant_id)
        where = " AND ".join(clauses)
        with self.transaction("listing recordings without a fingerprint") as cur:
            if limit is None:
                cur.execute(f"SELECT count(*) FROM call_recordings WHERE {where}", params)
                return [str(cur.fetchone()[0])]
            params.append(limit)
            cur.execute(
                f"SELECT id FROM call_recordings WHERE {where} ORDER BY id LIMIT %s",
                params,
            )
            return [str(r[0]) for r in cur.fetchall()]

    def set_decrypted_fingerprint(
        self, cur: Any, recording_id: str, fingerprint: str, key_id: str, object_key: str
    ) -> bool:
        """Record a fingerprint computed from the decrypted object; only where none exists.

        Compare-and-set on the object too: if rotation or erasure changed
        the recording while it was being decrypted, nothing is written.
        """
        cur.execute(
            "UPDATE call_recordings SET plaintext_hmac = %s, plaintext_hmac_key_id = %s,"
            " plaintext_hmac_source = 'decrypted', plaintext_hmac_at = now()"
            " WHERE id = %s AND plaintext_hmac IS NULL AND status = 'stored' AND s3_path = %s",
            (fingerprint, key_id, recording_id, object_key),
        )
        return bool(cur.rowcount == 1)
