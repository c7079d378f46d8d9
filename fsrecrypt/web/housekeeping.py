"""What ``fsrecrypt serve`` does on a timer beside answering requests.

- Audit anchors: a deployment that runs only the API (uploads, no
  FreeSWITCH daemon) must still get its access log's chain heads anchored
  every ``[audit] anchor_interval``. :func:`fsrecrypt.lifecycle.anchors.anchor_if_due`
  takes a PostgreSQL advisory lock and reads the age from the anchors
  themselves, so any number of servers and daemons may call it: one writes,
  the others return at once.
- Abandoned uploads: a server killed mid-upload leaves its upload's row
  pending with a lease that runs out; such rows are discarded (with an audit
  row) so they are neither a backlog nor taken for lost recordings.

A failure is logged and tried again at the next pass; it never stops the server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import gevent

from fsrecrypt.errors import FsrecryptError
from fsrecrypt.lifecycle.anchors import anchor_if_due
from fsrecrypt.pipeline import Services

log = logging.getLogger("fsrecrypt.web")
INTERVAL = 60.0


@dataclass
class Housekeeping:
    """One pass now and then: an anchor when due, abandoned uploads discarded."""

    services: Services
    interval: float = INTERVAL
    anchors_written: int = 0
    uploads_discarded: int = 0
    _greenlet: gevent.Greenlet | None = field(default=None, repr=False)

    def run_once(self) -> None:
        try:
            receipt = anchor_if_due(self.services, user_id="fsrecrypt-serve")
        except FsrecryptError as exc:
            log.warning(
                "audit anchor failed (retried in %.0f s): %s", self.interval, exc.one_line()
            )
        else:
            if receipt is not None:
                self.anchors_written += 1
                log.info("audit anchor %s written (sha256 %s)", receipt.seq, receipt.sha256)
        try:
            discarded = self.services.db.discard_abandoned_uploads()
        except FsrecryptError as exc:
            log.warning("could not discard abandoned uploads: %s", exc.one_line())
        else:
            if discarded:
                self.uploads_discarded += len(discarded)
                log.warning("discarded %d abandoned upload(s): %s", len(discarded), discarded)

    def _loop(self) -> None:
        while True:
            self.run_once()
            gevent.sleep(self.interval)

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
