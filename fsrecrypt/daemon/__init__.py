"""``fsrecrypt run``: the daemon that turns every RECORD_STOP into a stored recording.

The modules, along an event's path:

- ``esl``: the hardened Event Socket client (timeouts, reconnect, liveness);
  ``eslparse``: event bodies and what a RECORD_STOP means (pure functions);
- ``events``: an event becomes a pending row and a job (or a counted refusal);
- ``jobs``: the job's attempts, retries with backoff and final failure,
  calling ``fsrecrypt.pipeline`` (``pipeline/ingest.py``) to store it;
- ``sweep``: due rows, unfinished deletions, orphan files and uploads;
- ``health``: the heartbeat the daemon writes and the checks ``fsrecrypt health`` makes;
- ``supervisor``: the arbiter (signals, greenlet supervision, reload, drain,
  systemd), composing the parts around a shared ``runtime``;
- ``metrics``, ``systemd``, ``files``: the series, sd_notify, and which names
  in the recordings dirs to look at (the log configuration is ``fsrecrypt.logs``,
  shared with ``fsrecrypt worker``).

This package imports gevent, structlog and prometheus_client: ``fsrecrypt.cli``
loads it only inside the ``run`` and ``health`` commands (``run``
monkey-patches first). It never imports click or ``fsrecrypt.cli`` and never
prints.
"""

from __future__ import annotations

from fsrecrypt.daemon.files import wav_complete
from fsrecrypt.daemon.health import Check, overall_level, run_health
from fsrecrypt.daemon.jobs import Job, backoff
from fsrecrypt.daemon.supervisor import (
    EXIT_GREENLET_DIED,
    LOOP_CRASH_LIMIT,
    Daemon,
    LoopBroken,
    run_daemon,
)

__all__ = [
    "EXIT_GREENLET_DIED",
    "LOOP_CRASH_LIMIT",
    "Check",
    "Daemon",
    "Job",
    "LoopBroken",
    "backoff",
    "overall_level",
    "run_daemon",
    "run_health",
    "wav_complete",
]
