"""Bulk jobs: a job row plus its items in PostgreSQL, worked by any number of processes.

- ``kinds``: :class:`JobKind` (how one item is handled, how the job is
  summed up), :class:`Outcome` (``done``/``failed``/``skipped``),
  :class:`JobContext`, the registry :data:`KIND_MODULES`
- ``runner``: :func:`create_job` (items from a stream, inserted in
  batches), :class:`JobWorker` (claim, handle, record; heartbeat),
  :func:`run_job` (work one job in this process until it is finished)
- ``worker``: ``fsrecrypt worker``, the gevent process working every job

The SQL is in :mod:`fsrecrypt.db.jobs`. Never imports click or the CLI.
"""

from fsrecrypt.db.jobs import ItemRecord, Job, JobItem, JobStatus
from fsrecrypt.jobs.kinds import (
    KIND_MODULES,
    FinishedJob,
    JobContext,
    JobKind,
    Outcome,
    done,
    failed,
    job_kind,
    skipped,
)
from fsrecrypt.jobs.runner import ItemEvent, JobWorker, create_job, run_job

__all__ = [
    "KIND_MODULES",
    "FinishedJob",
    "ItemEvent",
    "ItemRecord",
    "Job",
    "JobContext",
    "JobItem",
    "JobKind",
    "JobStatus",
    "JobWorker",
    "Outcome",
    "create_job",
    "done",
    "failed",
    "job_kind",
    "run_job",
    "skipped",
]
