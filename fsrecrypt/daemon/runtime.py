"""What every part of a running daemon shares: config, services, metrics, the stop flag.

One :class:`Runtime` is built by the supervisor and handed to the job runner,
the event handler, the sweeper and the heartbeat. It holds no behaviour of
its own beyond counting outcomes and looking tenants up, so each part stays
about one responsibility and the supervisor can swap ``config`` on SIGHUP in
one place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import gevent.event

from fsrecrypt.config import Config
from fsrecrypt.daemon.metrics import Metrics
from fsrecrypt.daemon.systemd import Notifier
from fsrecrypt.db import Tenant
from fsrecrypt.errors import UnknownTenant
from fsrecrypt.logs import get_logger
from fsrecrypt.pipeline import Services, host_worker_prefix, worker_id


@dataclass
class Runtime:
    """The daemon's shared state; ``config`` is replaced (never mutated) on reload."""

    config: Config
    config_path: str | None = None
    services: Services = field(init=False)
    metrics: Metrics = field(default_factory=Metrics)
    notifier: Notifier = field(default_factory=Notifier)
    log: Any = field(default_factory=get_logger)
    stopping: gevent.event.Event = field(default_factory=gevent.event.Event)
    worker: str = field(default_factory=worker_id)
    worker_prefix: str = field(default_factory=host_worker_prefix)
    started_at: float = field(default_factory=time.time)
    counts: dict[str, int] = field(default_factory=dict)
    # Files this process must never adopt for the default tenant (their event
    # named an unknown tenant and the database could not record it, or their
    # name cannot be stored): the sweep skips them.
    refused_paths: set[str] = field(default_factory=set)
    # Recordings directories the last sweep could not list (the heartbeat
    # carries them, so `fsrecrypt health` reports what the daemon sees).
    unreadable_dirs: set[str] = field(default_factory=set)
    # The daemon's own record of progress, carried by the heartbeat: when it
    # last stored a recording, how many failed since, and the mtime of the
    # oldest plaintext file past the quiet period the last sweep saw.
    last_stored_at: float | None = None
    failed_since_store: int = 0
    oldest_plaintext_mtime: float | None = None

    def __post_init__(self) -> None:
        self.services = Services(self.config)

    def set_config(self, config: Config) -> None:
        self.config = config
        self.services.config = config

    # --- outcomes ---------------------------------------------------------------------

    def count(self, outcome: str) -> None:
        """One recording's outcome: the heartbeat's counts and ``fsrecrypt_recordings``."""
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if outcome in ("stored", "already-stored"):
            self.last_stored_at = time.time()
            self.failed_since_store = 0
        elif outcome == "failed":
            self.failed_since_store += 1
        self.metrics.recordings.labels(outcome).inc()

    def count_refused(self, reason: str) -> None:
        self.metrics.refused.labels(reason).inc()
        self.counts["refused"] = self.counts.get("refused", 0) + 1

    def refuse(self, reason: str, **fields: Any) -> None:
        """An event or file refused (path safety, a bad event): counted and logged."""
        self.count_refused(reason)
        self.log.warning("event.refused", reason=reason, **fields)

    # --- tenants ----------------------------------------------------------------------

    def tenant(self, name: str) -> Tenant:
        """Looked up for every recording, never cached: `fsrecrypt rotate` switches a
        tenant's key "at once", and a cached row would keep wrapping with the old key."""
        return self.services.db.tenant_by_name(name)

    def tenant_by_id(self, tenant_id: str) -> Tenant:
        return self.services.db.tenant_by_id(tenant_id)

    def tenant_exists(self, name: str) -> bool:
        try:
            self.tenant(name)
        except UnknownTenant:
            return False
        return True
