"""The ``[retention]``, ``[audit]`` and ``[pci]`` sections: how long recordings are kept,
where the audit chain's heads are anchored, how anchors and custody fingerprints are
keyed, and how masked (PCI-paused) spans are checked.

Their own module so the configuration schema stays readable; ``fsrecrypt.config``
composes them into :class:`fsrecrypt.config.Config` like every other section
(same strict loading, environment overrides ``FSRECRYPT_AUDIT_<KEY>``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["ANCHOR_SIGNATURES", "AuditConfig", "PciConfig", "RetentionConfig"]


@dataclass(frozen=True)
class RetentionConfig:
    days: int = 0

    def validate(self) -> None:
        if self.days < 0:
            raise ValueError("days must be >= 0 (0 = keep forever)")


ANCHOR_SIGNATURES = ("hmac-sha256", "ed25519", "kms-ecdsa-p256")


@dataclass(frozen=True)
class AuditConfig:
    """Where the audit chain's heads are anchored (write-once), and how anchors are signed.

    Why: the hash chain lives in the database it protects; a writer of that
    database can rewrite it consistently. Anchors put each chain's head
    where that writer cannot change it afterwards (see conf/fsrecrypt.toml).
    """

    anchor_dir: str = ""
    anchor_bucket: str = ""
    anchor_prefix: str = "audit-anchors/"
    anchor_retention_days: int = 2190
    anchor_lock_mode: str = "compliance"
    anchor_key_file: str = "/var/lib/fsrecrypt/audit-anchor.key"
    anchor_signature: str = "hmac-sha256"
    anchor_interval: float = 3600.0
    anchor_kms_key: str = ""
    anchor_kms_region: str = ""
    anchor_kms_endpoint_url: str = ""
    fingerprint_key_file: str = ""

    def validate(self) -> None:
        if self.anchor_dir and not os.path.isabs(self.anchor_dir):
            raise ValueError(f"anchor_dir: {self.anchor_dir[:100]!r} is not an absolute path")
        if self.anchor_prefix.startswith("/") or "\x00" in self.anchor_prefix:
            raise ValueError("anchor_prefix must not start with '/' or contain NUL")
        if not 1 <= self.anchor_retention_days <= 36500:
            raise ValueError("anchor_retention_days must be between 1 and 36500")
        if self.anchor_lock_mode not in ("governance", "compliance"):
            raise ValueError(
                f"anchor_lock_mode must be 'governance' or 'compliance', "
                f"not {self.anchor_lock_mode[:40]!r}"
            )
        if self.anchor_signature not in ANCHOR_SIGNATURES:
            raise ValueError(
                f"anchor_signature must be 'hmac-sha256', 'ed25519' or 'kms-ecdsa-p256', "
                f"not {self.anchor_signature[:40]!r}"
            )
        if self.anchor_signature == "kms-ecdsa-p256" and not self.anchor_kms_key:
            raise ValueError(
                "anchor_signature = 'kms-ecdsa-p256' needs anchor_kms_key "
                "(an ECC_NIST_P256 SIGN_VERIFY key: ARN, key id or alias)"
            )
        if not self.anchor_key_file or not os.path.isabs(self.anchor_key_file):
            raise ValueError("anchor_key_file must be an absolute path")
        if self.fingerprint_key_file and not os.path.isabs(self.fingerprint_key_file):
            raise ValueError("fingerprint_key_file must be an absolute path (or empty)")
        if not 60 <= self.anchor_interval <= 7 * 86400:
            raise ValueError("anchor_interval must be between 60 seconds and 7 days")

    @property
    def anchoring(self) -> bool:
        """True if anchors have somewhere to go."""
        return bool(self.anchor_dir or self.anchor_bucket)


@dataclass(frozen=True)
class PciConfig:
    """Masked (PCI-paused) spans: tracked from the events, checked in the audio.

    ``require_verified_mask`` (every tenant) or ``require_verified_mask_tenants``
    (those named) turn a recording whose announced mask the audio does not
    show into an alert: ``fsrecrypt health`` reports degraded until
    ``fsrecrypt recordings ack-mask ID`` acknowledges it.
    """

    track_masks: bool = True
    mask_tolerance: float = 0.5
    require_verified_mask: bool = False
    require_verified_mask_tenants: tuple[str, ...] = ()

    def validate(self) -> None:
        if not 0.02 <= self.mask_tolerance <= 10:
            raise ValueError("mask_tolerance must be between 0.02 and 10 seconds")
        for name in self.require_verified_mask_tenants:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
                raise ValueError(
                    f"require_verified_mask_tenants: {name[:70]!r} is not a tenant name"
                )

    def requires_verified_mask(self, tenant_name: str) -> bool:
        """Is an unverified mask of this tenant an alert?"""
        return self.require_verified_mask or tenant_name in self.require_verified_mask_tenants
