"""The mask check of one recording, planned from the database and run in the encrypting read.

Composes :mod:`fsrecrypt.db.masks` (what was announced) with
:mod:`fsrecrypt.maskcheck` (is it silent in the audio): :func:`plan_mask_check`
reads the recording's marks, :meth:`MaskCheck.wrap` puts the scanner in the
stream the encryptor reads (one read of the file for both), and
:meth:`MaskCheck.result` is what :meth:`~fsrecrypt.db.Database.mark_stored`
writes with the stored row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from fsrecrypt.db.masks import MAX_MARKS, MaskAnnouncement
from fsrecrypt.maskcheck import MaskVerdict, ScanningReader, SilenceScanner, announced_spans

if TYPE_CHECKING:
    from fsrecrypt.db import Recording
    from fsrecrypt.pipeline.services import Services


@dataclass
class MaskCheck:
    """One recording's announced spans and the scanner that checks them."""

    announcement: MaskAnnouncement
    scanner: SilenceScanner | None  # None: no span announced (a RECORD_START only)
    verdict: MaskVerdict | None = None

    def wrap(self, stream: BinaryIO | Any) -> BinaryIO | Any:
        """The stream the encryptor reads, seen by the scanner on the way."""
        return stream if self.scanner is None else ScanningReader(stream, self.scanner)

    def result(self) -> tuple[int, list[dict[str, Any]] | None, bool | None]:
        """(session id, spans, verdict) for mark_stored; spans and verdict None without a mask."""
        if self.scanner is None:
            return self.announcement.session_id, None, None
        if self.verdict is None:
            self.verdict = self.scanner.finish()
        return self.announcement.session_id, self.verdict.spans, self.verdict.verified

    @property
    def reason(self) -> str | None:
        return self.verdict.reason if self.verdict is not None else None


def plan_mask_check(services: Services, recording: Recording) -> MaskCheck | None:
    """The check for this recording: None without a kept RECORD_START (or tracking is off)."""
    pci = services.config.pci
    if not pci.track_masks:
        return None
    session = recording.encryption_metadata.get("mask_session")
    session_id = session if isinstance(session, int) and not isinstance(session, bool) else None
    announcement = services.db.mask_announcement(session_id, recording.source_path)
    if announcement is None:
        return None
    spans = announced_spans(announcement.started_us, announcement.stopped_us, announcement.marks)
    flooded = announcement.total_marks >= MAX_MARKS
    if not spans and not flooded:
        return MaskCheck(announcement, None)
    wall_ms = None
    if announcement.stopped_us is not None:
        wall_ms = max(0, (announcement.stopped_us - announcement.started_us) // 1000)
    scanner = SilenceScanner(
        spans, wall_ms, tolerance_ms=round(pci.mask_tolerance * 1000), flooded=flooded
    )
    return MaskCheck(announcement, scanner)
