"""Masked (PCI-paused) spans: the marks as they arrive, and each recording's verdict.

Written as the events arrive (``recording_mask_sessions``: one per
RECORD_START; ``recording_mask_marks``: each mask/unmask), so a daemon killed
between a mask and RECORD_STOP still knows the span after a restart. The
verdict (``call_recordings.mask_spans``/``mask_verified``) is written with the
stored row (:meth:`fsrecrypt.db.recordings.Recordings.mark_stored`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from fsrecrypt.db.audit import append_audit_row
from fsrecrypt.db.pool import Pool
from fsrecrypt.errors import InvalidState, NotFound

# A recording with more marks than this is flooded: further marks are refused
# (counted by the daemon) and the recording is flagged unverified.
MAX_MARKS = 10_000
# Sessions never linked to a stored recording (RECORD_STOP missed, file gone)
# are dropped by housekeeping after this many days.
ORPHAN_DAYS = 14

MarkOutcome = Literal["stored", "unknown-recording", "too-many"]


@dataclass(frozen=True)
class MaskAnnouncement:
    """What was announced for one recording: its start, its stop (if seen), its marks."""

    session_id: int
    started_us: int
    stopped_us: int | None
    marks: tuple[tuple[str, str, int], ...]  # (kind, via, at_us) in arrival order
    total_marks: int


def store_mask_verdict(
    cur: Any,
    recording_id: str,
    session_id: int,
    spans: list[dict[str, Any]] | None,
    ok: bool | None,
) -> None:
    """Inside mark_stored's transaction: the verdict on the row, the session linked to it.

    ``spans``/``ok`` None: the recording's start was seen but no mask (the
    session is linked so no later recording at the same path takes it).
    """
    cur.execute(
        "UPDATE call_recordings SET mask_spans = %s::jsonb, mask_verified = %s WHERE id = %s",
        (None if spans is None else json.dumps(spans), ok, recording_id),
    )
    cur.execute(
        "UPDATE recording_mask_sessions SET recording_id = %s WHERE id = %s",
        (recording_id, session_id),
    )


class MaskSessions(Pool):
    """The mask tables (part of :class:`fsrecrypt.db.Database`)."""

    def mask_session_start(self, core: str, channel: str, path: str, started_us: int) -> int:
        """Open (idempotently: a replayed RECORD_START finds its row) a recording's session."""
        with self.transaction("recording a RECORD_START") as cur:
            cur.execute(
                "INSERT INTO recording_mask_sessions (core_uuid, channel_uuid, source_path,"
                " started_us) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT ON CONSTRAINT recording_mask_sessions_unique DO NOTHING"
                " RETURNING id",
                (core, channel, path, started_us),
            )
            row = cur.fetchone()
            if row is None:
                cur.execute(
                    "SELECT id FROM recording_mask_sessions WHERE core_uuid = %s"
                    " AND channel_uuid = %s AND source_path = %s AND started_us = %s",
                    (core, channel, path, started_us),
                )
                row = cur.fetchone()
        return int(row[0])

    def mask_mark(
        self, core: str, channel: str, path: str, kind: str, via: str, at_us: int
    ) -> tuple[MarkOutcome, int | None]:
        """Append a mask/unmask to the open session of (core, channel, path).

        ``unknown-recording``: no RECORD_START seen for it (a made-up API
        command, a channel that records another path); ``too-many``: the
        session already holds MAX_MARKS (the session is still returned).
        """
        with self.transaction("recording a mask event") as cur:
            cur.execute(
                "SELECT id, marks FROM recording_mask_sessions WHERE core_uuid = %s"
                " AND channel_uuid = %s AND source_path = %s AND stopped_us IS NULL"
                " AND recording_id IS NULL ORDER BY started_us DESC, id DESC LIMIT 1"
                " FOR UPDATE",
                (core, channel, path),
            )
            row = cur.fetchone()
            if row is None:
                return "unknown-recording", None
            session_id, marks = int(row[0]), int(row[1])
            if marks >= MAX_MARKS:
                return "too-many", session_id
            cur.execute(
                "UPDATE recording_mask_sessions SET marks = marks + 1 WHERE id = %s",
                (session_id,),
            )
            cur.execute(
                "INSERT INTO recording_mask_marks (session_id, seq, kind, via, at_us)"
                " VALUES (%s, %s, %s, %s, %s)",
                (session_id, marks, kind, via, at_us),
            )
        return "stored", session_id

    def mask_session_stop(self, core: str, channel: str, path: str, stopped_us: int) -> int | None:
        """Close the open session of a recording at its RECORD_STOP; its id, or None."""
        # One UPDATE, atomic on its own: autocommit spares BEGIN and COMMIT
        # round trips on every RECORD_STOP.
        with self.statement("recording a RECORD_STOP's mask session") as cur:
            cur.execute(
                "UPDATE recording_mask_sessions SET stopped_us = %s WHERE id = ("
                " SELECT id FROM recording_mask_sessions WHERE core_uuid = %s"
                " AND channel_uuid = %s AND source_path = %s AND stopped_us IS NULL"
                " AND recording_id IS NULL ORDER BY started_us DESC, id DESC LIMIT 1)"
                " RETURNING id",
                (stopped_us, core, channel, path),
            )
            row = cur.fetchone()
        return int(row[0]) if row else None

    def mask_announcement(
        self, session_id: int | None, source_path: str
    ) -> MaskAnnouncement | None:
        """A recording's announced marks: by session id, else the newest open one of the path.

        The path fallback covers a file whose RECORD_STOP the daemon never
        handled (the sweep adopts it): its session is still open, so a span
        masked at that point runs to the end of the file. A closed session
        is only ever used by its id (its RECORD_STOP handed it to the row),
        so an older recording's spans never land on a new file at the path.
        """
        # The session and its marks in one statement (one round trip per
        # recording stored: this runs for every recording while tracking is on).
        if session_id is not None:
            where, args = "id = %s AND recording_id IS NULL", (session_id,)
        else:
            where = "source_path = %s AND recording_id IS NULL AND stopped_us IS NULL"
            args = (source_path,)
        with self.statement("reading a recording's mask events") as cur:
            cur.execute(
                "SELECT s.id, s.started_us, s.stopped_us, s.marks, COALESCE((SELECT"
                " array_agg(ARRAY[m.kind::text, m.via::text, m.at_us::text] ORDER BY m.seq)"
                " FROM recording_mask_marks m WHERE m.session_id = s.id), '{}')"
                f" FROM (SELECT * FROM recording_mask_sessions WHERE {where}"
                " ORDER BY started_us DESC, id DESC LIMIT 1) s",
                args,
            )
            row = cur.fetchone()
        if row is None:
            return None
        marks = tuple((str(k), str(v), int(t)) for k, v, t in row[4])
        return MaskAnnouncement(int(row[0]), int(row[1]), row[2], marks, int(row[3]))

    def unacknowledged_masks(self, tenant_ids: list[str] | None) -> int:
        """Stored recordings whose mask the audio does not show, not yet acknowledged.

        ``tenant_ids``: only these tenants (None: every tenant).
        """
        with self.transaction("counting unverified masks") as cur:
            if tenant_ids is None:
                cur.execute(
                    "SELECT count(*) FROM call_recordings"
                    " WHERE mask_verified = false AND mask_ack_at IS NULL"
                )
            else:
                cur.execute(
                    "SELECT count(*) FROM call_recordings WHERE mask_verified = false"
                    " AND mask_ack_at IS NULL AND tenant_id = ANY(%s::uuid[])",
                    (tenant_ids,),
                )
            return int(cur.fetchone()[0])

    def acknowledge_mask(self, recording_id: str, user_id: str, note: str) -> None:
        """Acknowledge a recording's unverified mask (audited, once)."""
        with self.transaction("acknowledging an unverified mask") as cur:
            cur.execute(
                "SELECT tenant_id, mask_verified, mask_ack_at FROM call_recordings"
                " WHERE id = %s FOR UPDATE",
                (recording_id,),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no recording with id {recording_id!r}")
            tenant_id, verified, acked = row
            if verified is not False:
                raise InvalidState(
                    f"recording {recording_id} has no unverified mask to acknowledge",
                    hint="Only a recording with mask_verified = false needs acknowledging.",
                )
            if acked is not None:
                raise InvalidState(f"recording {recording_id}'s mask was already acknowledged")
            cur.execute(
                "UPDATE call_recordings SET mask_ack_at = now(), mask_ack_by = %s WHERE id = %s",
                (user_id[:200], recording_id),
            )
            append_audit_row(
                cur,
                recording_id=recording_id,
                tenant_id=str(tenant_id),
                user_id=user_id,
                action="ack-mask",
                success=True,
                details={"note": note[:500]},
            )

    def drop_orphan_mask_sessions(self, days: int = ORPHAN_DAYS) -> int:
        """Forget sessions no stored recording claimed within ``days`` (housekeeping)."""
        with self.transaction("dropping orphan mask sessions") as cur:
            cur.execute(
                "DELETE FROM recording_mask_sessions WHERE recording_id IS NULL"
                " AND created_at < now() - make_interval(days => %s)",
                (days,),
            )
            return int(cur.rowcount or 0)
