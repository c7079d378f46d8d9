"""Header rewrite: give an object a header wrapped by the tenant's current key.

Needed when an old key must be retired completely: the header of every
object still holds the old wrapping until the object is rewritten. The
message id and frames are copied byte for byte; only the header changes.
"""

from __future__ import annotations

import json
import secrets
from itertools import chain
from typing import Any

from fsrecrypt import format as esdk
from fsrecrypt.db import Recording
from fsrecrypt.errors import InvalidState, StorageError
from fsrecrypt.lifecycle.common import ROTATION_META_KEYS, crash_point, insert_audit
from fsrecrypt.pipeline import Services, edk_from_bytes, encryption_context, read_object_header
from fsrecrypt.store import object_key


def finish_header_leftovers(services: Services, rec: Recording) -> bool:
    """Complete what a killed header rewrite left: delete the orphan or the superseded object.

    ``rotation_pending_object`` is written *before* a new object is uploaded,
    ``rotation_superseded_object`` in the same transaction that switches the
    row to the new object. Either way the name of every copy that exists
    outside the row's ``s3_path`` is in the database, so nothing a crash
    leaves behind can escape a later erasure or this cleanup.
    """
    meta = rec.encryption_metadata or {}
    cleaned = False
    for meta_key in ROTATION_META_KEYS:
        leftover = meta.get(meta_key)
        if not leftover:
            continue
        if leftover != rec.s3_path:
            services.store.delete(leftover)
        with services.db.transaction("clearing a rotation leftover") as cur:
            cur.execute(
                "UPDATE call_recordings SET encryption_metadata = encryption_metadata - %s"
                " WHERE id = %s AND encryption_metadata->>%s = %s",
                (meta_key, rec.id, meta_key, leftover),
            )
        cleaned = True
    return cleaned


def rewrite_header(services: Services, rec: Recording, target: str, user_id: str) -> str:
    """Give the object a header wrapped by the target key (same message, same frames).

    The new object is written under a new key (objects are never overwritten),
    the row is switched to it by compare-and-set, and only then is the old
    object deleted (all versions), so a crash at any point leaves the row
    pointing at a complete object whose header opens with a key we hold.
    """
    old_key = rec.s3_path or ""
    info = services.store.head(old_key)
    header = read_object_header(services.store, old_key, info.size)
    header_keys = [services.keys.key_for_edk(e) for e in header.encrypted_data_keys]
    # The new header keeps one EDK per escrow key too (the database's copies).
    escrow = services.db.escrow_deks(rec.id)
    if header_keys[:1] == [target] and len(header_keys) == 1 + len(escrow):
        _mark_header_key(services, rec, target)
        return "headers_current"
    db_edk = edk_from_bytes(rec.encrypted_dek_bytes())
    context = encryption_context(rec.tenant_id, rec.id)
    data_key = services.keys.decrypt_data_key([db_edk], context)
    new_header = esdk.rewrap_header(
        header, data_key, [db_edk, *(edk_from_bytes(raw) for _ref, raw in escrow)]
    )
    del data_key
    new_key = object_key(
        services.config.storage.prefix,
        rec.tenant_id,
        f"{rec.id}.{secrets.token_hex(4)}",
        rec.created_at,
    )
    with services.db.transaction("recording a pending object") as cur:
        cur.execute(
            "UPDATE call_recordings SET encryption_metadata = encryption_metadata || %s::jsonb"
            " WHERE id = %s AND status = 'stored' AND s3_path = %s AND encrypted_dek = %s",
            (json.dumps({"rotation_pending_object": new_key}), rec.id, old_key, rec.encrypted_dek),
        )
        if cur.rowcount != 1:
            raise InvalidState(
                f"recording {rec.id} changed while its header was being rewritten",
                hint="Run the rotate command again; it picks up the current state.",
            )
    body = services.store.get_range(old_key, header.size, None)
    put = services.store.put_stream(
        new_key,
        chain([new_header.raw], body),
        metadata={"fsrecrypt-recording-id": rec.id, "fsrecrypt-tenant-id": rec.tenant_id},
    )
    expected = info.size - header.size + new_header.size
    if put.size != expected:
        services.store.delete(new_key)
        raise StorageError(
            f"copy of object {old_key} is {put.size} bytes, expected {expected}",
            hint="The object changed while it was copied; run the rotate command again.",
        )
    crash_point("uploaded")
    meta_update: dict[str, Any] = {
        "rotation_superseded_object": old_key,
        "header_size": new_header.size,
        "header_key_id": target,
    }
    if put.version_id:
        meta_update["object_version"] = put.version_id
    with services.db.transaction("switching to the rewritten object") as cur:
        cur.execute(
            "UPDATE call_recordings SET s3_path = %s, encrypted_size_bytes = %s,"
            " updated_at = now(), encryption_metadata ="
            " (encryption_metadata - 'rotation_pending_object' - 'object_version') || %s::jsonb"
            " WHERE id = %s AND status = 'stored' AND s3_path = %s AND encrypted_dek = %s",
            (new_key, put.size, json.dumps(meta_update), rec.id, old_key, rec.encrypted_dek),
        )
        switched = cur.rowcount == 1
        if switched:
            insert_audit(
                services,
                cur,
                action="rotate",
                user_id=user_id,
                success=True,
                recording_id=rec.id,
                tenant_id=rec.tenant_id,
                details={
                    "step": "rewrite_header",
                    "to_key": target,
                    "old_object": old_key,
                    "new_object": new_key,
                },
            )
    if not switched:
        services.store.delete(new_key)
        raise InvalidState(
            f"recording {rec.id} changed while its header was being rewritten",
            hint="Run the rotate command again; it picks up the current state.",
        )
    crash_point("swapped")
    services.store.delete(old_key)
    with services.db.transaction("clearing a superseded object") as cur:
        cur.execute(
            "UPDATE call_recordings SET encryption_metadata ="
            " encryption_metadata - 'rotation_superseded_object' WHERE id = %s AND s3_path = %s",
            (rec.id, new_key),
        )
    return "headers_rewritten"


def _mark_header_key(services: Services, rec: Recording, target: str) -> None:
    with services.db.transaction("noting the header's key") as cur:
        cur.execute(
            "UPDATE call_recordings SET encryption_metadata = encryption_metadata || %s::jsonb"
            " WHERE id = %s AND s3_path = %s",
            (json.dumps({"header_key_id": target}), rec.id, rec.s3_path),
        )
