"""What the lifecycle operations share: paging, timestamps, audit rows, selecting and locking rows.

Every lifecycle operation changes or proves something about recordings
that are already stored, so all of them follow the same two rules:

* Resumable and idempotent: each recording is handled in its own
  transactions with compare-and-set on the columns it changes.
* Accountable: every change writes its hash-chained audit row in the *same*
  transaction as the change (``insert_audit``).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from fsrecrypt.db import Recording
from fsrecrypt.errors import ConfigError, NotFound
from fsrecrypt.pipeline import Services

PAGE = 500
# Names of object copies a killed header rewrite can leave outside ``s3_path``.
ROTATION_META_KEYS = ("rotation_pending_object", "rotation_superseded_object")

# Test-only: "STEP:N" makes `rotate` SIGKILL itself after the N-th STEP
# (rewrapped, uploaded, swapped; escrow for `tenants set-keys`) so the tests
# can prove a killed rotation resumes. Unset in production; it never changes what a normal run does.
_CRASH_ENV = "FSRECRYPT_TEST_ROTATE_CRASH_AT"
_crash_counts: dict[str, int] = {}

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)``: once with ``done = 0`` when the total is
known, then after each recording. The command line turns it into a bar; the
domain never prints."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="microseconds") if value else None


def insert_audit(services: Services, cur: Any, **fields: Any) -> int:
    """Write an audit row inside the caller's transaction (change + log commit together)."""
    return int(services.db.audit_in_transaction(cur, **fields))


def tenant_names(services: Services) -> dict[str, str]:
    return {t.id: t.name for t in services.db.tenants()}


def select_recordings(
    services: Services,
    *,
    recording_id: str | None = None,
    call_uuid: str | None = None,
    tenant_name: str | None = None,
) -> list[Recording]:
    """The recordings named by exactly one of --recording, --call or --tenant."""
    given = [v for v in (recording_id, call_uuid, tenant_name) if v]
    if len(given) != 1:
        raise ConfigError(
            "name exactly one of --recording, --call or --tenant",
            hint="Pass one selector, e.g. --recording ID.",
        )
    if recording_id:
        return [services.db.recording(recording_id)]
    if call_uuid:
        found = services.db.recordings(call_uuid=call_uuid)
        if not found:
            raise NotFound(f"no recording for call {call_uuid!r}")
        return found
    tenant = services.db.tenant_by_name(tenant_name or "")
    return services.db.recordings(tenant_id=tenant.id)


def lock_recording(cur: Any, recording_id: str) -> tuple[str, str, Any] | None:
    """Lock a row for the transaction: (status, tenant_id, metadata) or None."""
    cur.execute(
        "SELECT status, tenant_id, encryption_metadata, s3_path FROM call_recordings"
        " WHERE id = %s FOR UPDATE",
        (recording_id,),
    )
    row = cur.fetchone()
    return (row[0], str(row[1]), (row[2] or {}, row[3])) if row else None


def active_holds(cur: Any, recording_ids: Sequence[str]) -> dict[str, str]:
    if not recording_ids:
        return {}
    cur.execute(
        "SELECT recording_id, reason FROM legal_holds"
        " WHERE released_at IS NULL AND recording_id = ANY(%s::uuid[])",
        (list(recording_ids),),
    )
    return {str(r[0]): r[1] for r in cur.fetchall()}


def crash_point(step: str) -> None:
    """Test-only crash injection (see ``_CRASH_ENV``); a no-op unless the variable is set."""
    spec = os.environ.get(_CRASH_ENV)
    if not spec:
        return
    want_step, _, count = spec.partition(":")
    if want_step != step:
        return
    _crash_counts[step] = _crash_counts.get(step, 0) + 1
    if _crash_counts[step] >= int(count or "1"):
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
