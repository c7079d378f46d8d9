"""Branch keys ([keys] provider = "aws-kms-hierarchy"): which KMS key protects each one.

A row exists only for a branch key that is not (or no longer) protected by
``[keys] key_store_kms_key``: ``fsrecrypt rotate`` writes it after moving the
branch key's items to another KMS key, and the key provider reads it (once
per cache TTL) to pick the key store it trusts for that branch key.
"""

from __future__ import annotations

from fsrecrypt.db.pool import Pool


class BranchKeys(Pool):
    """Branch key queries (part of :class:`fsrecrypt.db.Database`)."""

    def branch_key_kms(self, branch_key_id: str) -> str | None:
        """The KMS key ARN recorded for ``branch_key_id``, or None (the configured one)."""
        with self.transaction("looking up a branch key's KMS key") as cur:
            cur.execute(
                "SELECT kms_key_arn FROM branch_keys WHERE branch_key_id = %s", (branch_key_id,)
            )
            row = cur.fetchone()
        return str(row[0]) if row else None

    def set_branch_key_kms(self, branch_key_id: str, kms_key_arn: str) -> None:
        """Record that ``branch_key_id`` is now protected by ``kms_key_arn``."""
        with self.transaction("recording a branch key's KMS key") as cur:
            cur.execute(
                "INSERT INTO branch_keys (branch_key_id, kms_key_arn) VALUES (%s, %s)"
                " ON CONFLICT (branch_key_id) DO UPDATE"
                " SET kms_key_arn = EXCLUDED.kms_key_arn, updated_at = now()",
                (branch_key_id, kms_key_arn),
            )

    def tenants_on_branch_key(self, branch_key_id: str) -> list[str]:
        """Names of the tenants whose key is ``branch_key_id`` (a branch key may be shared)."""
        with self.transaction("listing a branch key's tenants") as cur:
            cur.execute(
                "SELECT name FROM tenants WHERE kms_key_id = %s ORDER BY name", (branch_key_id,)
            )
            return [str(r[0]) for r in cur.fetchall()]
