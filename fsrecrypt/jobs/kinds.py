"""What a job kind is: how one item is handled, how the job is summed up, the registry.

A kind is a :class:`JobKind` in a module named in :data:`KIND_MODULES`
(imported only when a job of that kind is worked, like the command line's
lazy commands). Its ``handle(ctx, payload)`` does ONE item and returns an
:class:`Outcome`; raising a typed error fails the item (a transient one is
retried with backoff first). Its ``finish(ctx, finished)`` runs once, when
no item is left, and returns the JSON summary stored on the job (what the
creating command prints). See ``notes/fleet-jobs-API.md`` for the contract.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fsrecrypt.db.jobs import ItemRecord, Job
from fsrecrypt.errors import ConfigError
from fsrecrypt.pipeline import Services

# kind name -> module defining ``JOB_KIND`` (imported when first needed).
KIND_MODULES: dict[str, str] = {
    "rotate": "fsrecrypt.lifecycle.rotate",
    "backfill": "fsrecrypt.backfill.job",
    "verify": "fsrecrypt.lifecycle.verify",
    "erase": "fsrecrypt.lifecycle.erase",
    "expire": "fsrecrypt.lifecycle.erase",
}


@dataclass(frozen=True)
class Outcome:
    """What became of one item: ``done``, ``failed`` or ``skipped``, a message, a small result."""

    state: str
    message: str = ""
    result: Mapping[str, Any] | None = None


def done(message: str = "", **result: Any) -> Outcome:
    return Outcome("done", message, result or None)


def skipped(message: str, **result: Any) -> Outcome:
    return Outcome("skipped", message, result or None)


def failed(message: str, **result: Any) -> Outcome:
    return Outcome("failed", message, result or None)


@dataclass
class JobContext:
    """What a kind's ``handle``/``finish`` get: the job, the services, a per-process cache.

    ``services`` (config, db, keys, store) is shared by every item this
    process works; ``cache`` lives as long as the process works this job
    (put clients built from ``job.params`` there, e.g. a source S3 client).
    """

    services: Services
    job: Job
    worker: str
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params


@dataclass
class FinishedJob:
    """What ``finish`` sees: the counts and a stream over every item's record."""

    job: Job
    counts: dict[str, int]
    _items: Callable[[], Iterator[ItemRecord]]

    def items(self) -> Iterator[ItemRecord]:
        """Every item (``seq``, ``state``, ``payload``, ``message``, ``result``), in order."""
        return self._items()


Handler = Callable[[JobContext, dict[str, Any]], Outcome]
Finisher = Callable[[JobContext, FinishedJob], dict[str, Any]]


def _no_summary(ctx: JobContext, finished: FinishedJob) -> dict[str, Any]:
    return dict(finished.counts)


@dataclass(frozen=True)
class JobKind:
    """One kind of bulk job.

    ``max_attempts`` (None: ``[jobs] max_attempts``) bounds how often an item
    is tried after transient errors or lost leases before it fails;
    ``retry_transient`` False fails an item at its first error of any kind
    (for operations whose summary names each failure for the operator to
    fix, as ``rotate`` always did).
    """

    name: str
    handle: Handler
    finish: Finisher = _no_summary
    description: str = ""
    max_attempts: int | None = None
    retry_transient: bool = True


def job_kind(name: str) -> JobKind:
    """The registered kind called ``name`` (its module imported now)."""
    module_name = KIND_MODULES.get(name)
    if module_name is None:
        raise ConfigError(
            f"unknown job kind {name!r}",
            hint=f"Known kinds: {', '.join(sorted(KIND_MODULES))}; a newer fsrecrypt may know it.",
        )
    module = importlib.import_module(module_name)
    kinds = getattr(module, "JOB_KINDS", None) or {module.JOB_KIND.name: module.JOB_KIND}
    kind = kinds.get(name)
    if kind is None:
        raise ConfigError(f"{module_name} defines no job kind {name!r}")
    return kind
