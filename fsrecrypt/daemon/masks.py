"""Masked (PCI-paused) spans in the daemon: marks kept as they arrive, verdicts reported.

:class:`MaskTracker` runs in the ESL dispatcher (called by
:class:`~fsrecrypt.daemon.events.EventHandler`): a RECORD_START opens a
recording's session in PostgreSQL, each mask/unmask is appended to it, and
RECORD_STOP closes it and hands its id to the job (``metadata.mask_session``).
Everything is written as it arrives, so a daemon killed between a mask and
RECORD_STOP still knows the span after a restart. The audio check happens in
the encrypting read (``pipeline/masks.py``); its verdict is counted and
logged here, and :func:`check_masks` is the ``fsrecrypt health`` check.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fsrecrypt.daemon.eslmask import classify_mark, event_time_us
from fsrecrypt.daemon.eslparse import Event, RecordStop
from fsrecrypt.errors import EventError, FsrecryptError, InvalidState

if TYPE_CHECKING:
    from fsrecrypt.config import Config
    from fsrecrypt.daemon.runtime import Runtime
    from fsrecrypt.pipeline import Services, StoreOutcome

MARK_EVENTS = frozenset({"RECORD_START", "CHANNEL_EXECUTE", "API"})
HOUSEKEEPING_INTERVAL = 3600.0
# Refused mask events are counted each, logged at most this often per reason:
# anyone with API access can send "uuid_record <any> mask <any>" in a loop.
REFUSAL_LOG_INTERVAL = 10.0


class MaskTracker:
    """The daemon's side of mask tracking (events in, verdicts out)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._last_housekeeping = 0.0
        self._refusals: dict[str, tuple[float, int]] = {}  # reason -> (last logged, suppressed)

    def _refuse(self, reason: str, **fields: Any) -> None:
        """Count every refusal; log one per REFUSAL_LOG_INTERVAL per reason (with the skipped)."""
        now = time.monotonic()
        last, suppressed = self._refusals.get(reason, (-REFUSAL_LOG_INTERVAL, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self.rt.count_refused(reason)
            self._refusals[reason] = (last, suppressed + 1)
            return
        self._refusals[reason] = (now, 0)
        self.rt.refuse(reason, suppressed_since_last=suppressed, **fields)

    @property
    def enabled(self) -> bool:
        return self.rt.config.pci.track_masks

    def on_event(self, event: Event) -> None:
        """A RECORD_START, CHANNEL_EXECUTE or API event: maybe a mark; stored, or refused."""
        rt = self.rt
        try:
            mark = classify_mark(event)
        except EventError as exc:
            rt.metrics.mask_events.labels("malformed").inc()
            self._refuse("bad-mask-event", error=str(exc))
            return
        if mark is None:
            return
        fields = {
            "channel_uuid": mark.channel_uuid,
            "path": mark.path,
            "kind": mark.kind,
            "via": mark.via,
        }
        db = rt.services.db
        try:
            if mark.kind == "start":
                db.mask_session_start(
                    mark.core_uuid, mark.channel_uuid, mark.path, mark.timestamp_us
                )
                rt.metrics.mask_events.labels("start").inc()
                return
            outcome, session = db.mask_mark(
                mark.core_uuid,
                mark.channel_uuid,
                mark.path,
                mark.kind,
                mark.via,
                mark.timestamp_us,
            )
        except FsrecryptError as exc:
            # Not persisted: the recording will be flagged (the audio check
            # cannot know the span), never silently treated as unmasked.
            rt.metrics.mask_events.labels("not-recorded").inc()
            rt.log.error("mask.not_recorded", error=exc.one_line(), **fields)
            return
        rt.metrics.mask_events.labels(outcome).inc()
        if outcome == "stored":
            rt.log.info("mask.event", session=session, **fields)
        elif outcome == "unknown-recording":
            self._refuse(
                "mask-unknown-recording",
                error="mask event for a recording whose RECORD_START was not seen",
                **fields,
            )
        else:
            rt.log.error("mask.too_many_events", session=session, **fields)

    def on_record_stop(self, rs: RecordStop, metadata: dict[str, Any]) -> None:
        """Close the recording's session; its id goes to the job (and the pending row)."""
        if not self.enabled or not rs.channel_uuid:
            return
        stopped = event_time_us(rs.event_timestamp) or int(time.time() * 1_000_000)
        try:
            session = self.rt.services.db.mask_session_stop(
                rs.core_uuid, rs.channel_uuid, rs.path, stopped
            )
        except FsrecryptError as exc:
            # The store step finds the (still open) session by path instead.
            self.rt.log.warning("mask.stop_not_recorded", path=rs.path, error=exc.one_line())
            return
        if session is not None:
            metadata["mask_session"] = session

    def on_stored(self, outcome: StoreOutcome, tenant: str | None) -> None:
        """Count and log the verdict of a stored recording that had a mask announced."""
        rec = outcome.recording
        if rec.mask_verified is None or outcome.already_stored:
            return
        rt = self.rt
        spans = rec.mask_spans or []
        if rec.mask_verified:
            rt.metrics.mask_verdicts.labels("verified").inc()
            rt.log.info("recording.mask_verified", recording_id=rec.id, spans=len(spans))
            return
        rt.metrics.mask_verdicts.labels("unverified").inc()
        alert = tenant is not None and rt.config.pci.requires_verified_mask(tenant)
        (rt.log.error if alert else rt.log.warning)(
            "recording.mask_unverified",
            recording_id=rec.id,
            tenant=tenant,
            spans=len(spans),
            silent=sum(1 for s in spans if s.get("silent")),
            reason=outcome.mask_reason,
            alert=alert,
            hint="Stored anyway (audio is never lost). Listen to the spans; "
            "'fsrecrypt recordings ack-mask ID' acknowledges it.",
        )

    def housekeeping(self) -> None:
        """Drop sessions no stored recording claimed for days (at most hourly)."""
        if time.monotonic() - self._last_housekeeping < HOUSEKEEPING_INTERVAL:
            return
        self._last_housekeeping = time.monotonic()
        try:
            dropped = self.rt.services.db.drop_orphan_mask_sessions()
        except FsrecryptError as exc:
            self.rt.log.warning("mask.housekeeping_failed", error=exc.one_line())
            return
        if dropped:
            self.rt.log.info("mask.orphan_sessions_dropped", count=dropped)


def check_masks(config: Config, services: Services) -> str:
    """``fsrecrypt health``: degraded while a required tenant has an unacknowledged bad mask."""
    pci = config.pci
    if not (pci.require_verified_mask or pci.require_verified_mask_tenants):
        return "verified masks not required"
    ids = None
    if not pci.require_verified_mask:
        wanted = set(pci.require_verified_mask_tenants)
        ids = [t.id for t in services.db.tenants() if t.name in wanted]
    count = services.db.unacknowledged_masks(ids)
    if count:
        raise InvalidState(
            f"{count} stored recording(s) with a mask the audio does not show, not acknowledged",
            hint="List them with 'fsrecrypt recordings list --mask unverified', listen to the "
            "spans, then 'fsrecrypt recordings ack-mask ID'.",
        )
    return "no unacknowledged unverified mask"
