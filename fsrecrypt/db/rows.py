"""The rows the rest of fsrecrypt speaks in: a tenant and a recording, as read from the database."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fsrecrypt.errors import InvalidState


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    kms_key_id: str
    created_at: datetime
    # Escrow wrapping keys (migration 0010), tried in this order after kms_key_id.
    escrow_key_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recording:
    id: str
    tenant_id: str
    call_uuid: str | None
    core_uuid: str | None
    source_path: str
    source_fingerprint: str
    status: str
    encrypted: bool
    encryption_algorithm: str | None
    encrypted_dek: str | None
    kms_key_id: str | None
    s3_path: str | None
    file_size_bytes: int | None
    encrypted_size_bytes: int | None
    encryption_metadata: dict[str, Any]
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    claimed_by: str | None
    claimed_until: datetime | None
    created_at: datetime
    updated_at: datetime
    stored_at: datetime | None
    erased_at: datetime | None
    # Masked (PCI-paused) spans as verified before encryption (migration 0013):
    # None when no mask was announced.
    mask_spans: list[dict[str, Any]] | None = None
    mask_verified: bool | None = None
    mask_ack_at: datetime | None = None
    mask_ack_by: str | None = None

    def encrypted_dek_bytes(self) -> bytes:
        if not self.encrypted_dek:
            raise InvalidState(
                f"recording {self.id} has no wrapped data key (status {self.status})"
            )
        return base64.b64decode(self.encrypted_dek)


RECORDING_COLUMNS = ", ".join(Recording.__dataclass_fields__)
TENANT_COLUMNS = ", ".join(Tenant.__dataclass_fields__)


def recording_from_row(row: Sequence[Any]) -> Recording:
    values = dict(zip(Recording.__dataclass_fields__, row, strict=True))
    values["id"] = str(values["id"])
    values["tenant_id"] = str(values["tenant_id"])
    return Recording(**values)


def tenant_from_row(row: Sequence[Any]) -> Tenant:
    values = dict(zip(Tenant.__dataclass_fields__, row, strict=True))
    values["id"] = str(values["id"])
    values["escrow_key_ids"] = tuple(values.get("escrow_key_ids") or ())
    return Tenant(**values)
