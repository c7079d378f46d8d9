"""``erase --tenant`` at scale: the refusal checks asked of PostgreSQL, the selection streamed.

A tenant may own millions of recordings, so nothing here holds them all in
memory. The checks are those ``check_erasable`` makes over a list (rows
still pending, active legal holds, retention, S3 Object Lock) asked as SQL
(Object Lock per object, streamed); what ``confirm`` is shown is a sequence
that counts with SQL and iterates through a server-side cursor; the job's
items are the ids, streamed the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from fsrecrypt.db import Recording
from fsrecrypt.db.rows import RECORDING_COLUMNS, recording_from_row
from fsrecrypt.errors import InvalidState
from fsrecrypt.lifecycle.common import iso, utc_now
from fsrecrypt.lifecycle.erase import RetentionActive, _check_storage_lock
from fsrecrypt.lifecycle.holds import LegalHoldActive
from fsrecrypt.pipeline import Services

SHOWN = 20  # ids named in a refusal


class TenantRecordings(Sequence[Recording]):
    """Every recording of one tenant, counted once and read lazily in id order."""

    def __init__(self, services: Services, tenant_id: str) -> None:
        self.services = services
        self.tenant_id = tenant_id
        with services.db.transaction("counting a tenant's recordings") as cur:
            cur.execute("SELECT count(*) FROM call_recordings WHERE tenant_id = %s", (tenant_id,))
            self._count = int(cur.fetchone()[0])

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Recording]:
        for row in self.services.db.stream_rows(
            f"SELECT {RECORDING_COLUMNS} FROM call_recordings WHERE tenant_id = %s"  # noqa: S608
            " ORDER BY id",
            (self.tenant_id,),
        ):
            yield recording_from_row(row)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            return list(itertools.islice(iter(self), start, stop, step))
        position = index + self._count if index < 0 else index
        if not 0 <= position < self._count:
            raise IndexError(index)
        return next(itertools.islice(iter(self), position, None))

    def ids(self) -> Iterator[dict[str, str]]:
        """The job's item payloads, streamed."""
        for (rec_id,) in self.services.db.stream_rows(
            "SELECT id FROM call_recordings WHERE tenant_id = %s ORDER BY id", (self.tenant_id,)
        ):
            yield {"id": str(rec_id)}


def check_tenant_erasable(
    services: Services,
    selection: TenantRecordings,
    *,
    override_retention: bool,
    now: datetime | None = None,
) -> None:
    """``check_erasable`` for a whole tenant, without loading its recordings."""
    now = now or utc_now()
    tenant_id = selection.tenant_id
    days = services.config.retention.days
    with services.db.transaction("checking a tenant's erasure") as cur:
        cur.execute(
            "SELECT id FROM call_recordings WHERE tenant_id = %s AND status = 'pending'"
            " ORDER BY id LIMIT %s",
            (tenant_id, SHOWN),
        )
        pending = [str(r[0]) for r in cur.fetchall()]
        if pending:
            raise InvalidState(
                f"recording(s) {', '.join(pending)} are still being stored",
                hint="Wait until they are stored (or failed), then erase them.",
            )
        cur.execute(
            "SELECT h.recording_id, h.reason FROM legal_holds h"
            " JOIN call_recordings r ON r.id = h.recording_id"
            " WHERE r.tenant_id = %s AND r.status <> 'erased' AND h.released_at IS NULL"
            " ORDER BY h.recording_id LIMIT %s",
            (tenant_id, SHOWN),
        )
        held = [(str(r[0]), r[1]) for r in cur.fetchall()]
        if held:
            raise LegalHoldActive(
                "legal hold blocks erasure of "
                + ", ".join(f"{rid} ({reason})" for rid, reason in held)
            )
        if not override_retention:
            inside = "" if days <= 0 else " AND created_at > %s"
            params: list[Any] = [tenant_id] + ([now - timedelta(days=days)] if days > 0 else [])
            cur.execute(
                "SELECT count(*) OVER (), id, created_at FROM call_recordings"  # noqa: S608
                f" WHERE tenant_id = %s AND status <> 'erased'{inside}"
                " ORDER BY created_at, id LIMIT 1",
                params,
            )
            row = cur.fetchone()
            if row is not None:
                count, first, created = int(row[0]), str(row[1]), row[2]
                period = f"{days} days" if days else "forever ([retention] days = 0)"
                until = f" (until {iso(created + timedelta(days=days))})" if days > 0 else ""
                raise RetentionActive(
                    f"{count} recording(s) are inside the retention period of {period}, "
                    f"e.g. {first}{until}"
                )
    if services.store.object_lock:
        _check_storage_lock(services, (r for r in selection if r.status != "erased"), now)
