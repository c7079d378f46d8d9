"""Is the daemon well? The heartbeat it writes, and the checks ``fsrecrypt health`` makes.

:class:`Heartbeat` runs in the ``housekeeping`` loop: every few seconds it
writes the heartbeat file (pid, state, dead greenlets, ESL link, queue,
progress, counts), sets the gauges, sends the ``fsrecrypt::status`` CUSTOM
event and systemd's STATUS line. :func:`run_health` reads that file and
checks FreeSWITCH, PostgreSQL, the keys, the store and the backlog itself;
the command prints the result and exits 0 (healthy), 1 (degraded) or 2 (down).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent

from fsrecrypt.config import Config
from fsrecrypt.daemon.esl import EslSettings, EventSource, probe_status
from fsrecrypt.daemon.jobs import JobQueue
from fsrecrypt.daemon.masks import MaskTracker, check_masks
from fsrecrypt.daemon.runtime import Runtime
from fsrecrypt.errors import (
    DatabaseError,
    EslError,
    FsrecryptError,
    InputFileError,
    InvalidState,
    KeyAccessError,
    PathUnreadable,
    StorageError,
)
from fsrecrypt.pipeline import Services

STATUS_SUBCLASS = "fsrecrypt::status"
HEARTBEAT_INTERVAL = 5.0
STATUS_EVENT_INTERVAL = 30.0
ANCHOR_CHECK_INTERVAL = 60.0
"""How often the housekeeping loop asks whether an audit anchor is due (the
anchor itself is written every [audit] anchor_interval, by one process)."""
# Seconds the daemon may be without FreeSWITCH before health calls it degraded
# (a restart of FreeSWITCH takes a few seconds; reconnects back off).
ESL_DOWN_LIMIT = 30.0
# How often the daemon checks, from its own process, that it can use its
# keyring (or reach KMS) and write to its store: often enough for health to
# notice a chmod or an expired credential within a minute, rarely enough
# that a KMS round trip per heartbeat is never paid. A failing check is
# repeated sooner, so the recovery shows quickly too.
SELF_CHECK_INTERVAL = 60.0
SELF_CHECK_RETRY = 15.0
# Seconds a plaintext file may stay on disk past the quiet period before
# health calls it left behind (the sweep runs every sweep_interval).
PLAINTEXT_MARGIN = 120.0


class Heartbeat:
    """The daemon's outward signs of life: heartbeat file, gauges, status event, STATUS=."""

    def __init__(self, rt: Runtime, jobs: JobQueue, failures: list[dict[str, Any]]) -> None:
        self.rt = rt
        self.jobs = jobs
        self.failures = failures  # the supervisor's record of dead greenlets
        self.events: EventSource | None = None
        self._last_status_event = 0.0
        self._next_anchor_check = 0.0
        self._write_failing = False  # warned once; quiet until a write succeeds again
        self.esl_down_since: float | None = time.time()  # not connected yet
        self.self_checks: dict[str, dict[str, Any]] = {}
        self._next_self_check = 0.0
        self.masks = MaskTracker(rt)

    @property
    def esl_connected(self) -> bool:
        return bool(self.events and self.events.connected)

    def write(self, state: str = "running", esl_connected: bool | None = None) -> None:
        """Write the heartbeat file atomically; ``failed`` wins whenever a greenlet died."""
        path = self.rt.config.metrics.heartbeat_file
        if not path:
            return
        doc = {
            "pid": os.getpid(),
            "time": time.time(),
            "state": "failed" if self.failures else state,
            "failures": self.failures,
            "esl_connected": self.esl_connected if esl_connected is None else esl_connected,
            "queue": self.jobs.depth(),
            "progress_ok": self.jobs.progress_ok(),
            "started_at": self.rt.started_at,
            "counts": self.rt.counts,
            # What the daemon itself observes, with its own rights (health
            # runs as whoever calls it and could see otherwise).
            "esl_down_since": None if self.esl_connected else self.esl_down_since,
            "unreadable_dirs": sorted(self.rt.unreadable_dirs)[:20],
            "self_checks": self.self_checks,
            "last_stored_at": self.rt.last_stored_at,
            "failed_since_store": self.rt.failed_since_store,
            "oldest_plaintext_mtime": self.rt.oldest_plaintext_mtime,
        }
        tmp = f"{path}.tmp"
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            os.replace(tmp, path)
        except OSError as exc:
            # Once, not every HEARTBEAT_INTERVAL: outside systemd the default
            # /run/fsrecrypt usually does not exist, and a warning every 5 s
            # would bury everything else in the log.
            if not self._write_failing:
                self._write_failing = True
                self.rt.log.warning(
                    "daemon.heartbeat_failed",
                    path=path,
                    error=exc.strerror,
                    hint="Set [metrics] heartbeat_file to a path this user may write "
                    "(the unit's RuntimeDirectory=fsrecrypt provides /run/fsrecrypt), "
                    "or to \"\" to turn it off; 'fsrecrypt health' reads it.",
                )
            return
        if self._write_failing:
            self._write_failing = False
            self.rt.log.info("daemon.heartbeat_written", path=path)

    def housekeeping_pass(self) -> None:
        """Heartbeat, gauges and the CUSTOM status event (the ``housekeeping`` loop's pass)."""
        rt = self.rt
        self.run_self_checks()
        self.write()
        depth = self.jobs.depth()
        rt.metrics.queue_depth.set(depth)
        if self.events is not None:
            rt.metrics.reconnects.set(self.events.reconnects)
        try:
            age = rt.services.db.oldest_pending_age()
            rt.metrics.oldest_pending.set(age)
        except FsrecryptError:
            age = -1.0
        if time.monotonic() - self._last_status_event >= STATUS_EVENT_INTERVAL:
            if self.send_status_event(depth, age):
                self._last_status_event = time.monotonic()
        self.anchor_if_due()
        self.masks.housekeeping()
        rt.notifier.notify(
            f"STATUS=running; queue {depth}; esl "
            f"{'up' if self.esl_connected else 'down'}; "
            f"stored {rt.counts.get('stored', 0)}"
        )

    def run_self_checks(self, force: bool = False) -> None:
        """Can this process use its keyring and write its store? (At most every
        SELF_CHECK_INTERVAL; `fsrecrypt health` may run as another user and see
        otherwise, so the heartbeat carries the daemon's own answer.)"""
        if not force and time.monotonic() < self._next_self_check:
            return
        services = self.rt.services

        def keys() -> str:
            tenants = services.db.tenants()
            for t in tenants:
                services.keys.check_key(t.kms_key_id)
                for ref in t.escrow_key_ids:  # an escrow key that stopped working
                    services.escrow.check(ref)
            return f"{len(tenants)} tenant key(s) usable"

        def store() -> str:
            services.store.check()
            return f"{services.store.name} writable"

        results: dict[str, dict[str, Any]] = {}
        for name, probe in (("keys", keys), ("store", store)):
            try:
                results[name] = {"ok": True, "detail": probe()}
            except DatabaseError as exc:  # cannot list the tenants: unknown, not unusable
                results[name] = {"ok": None, "detail": exc.message[:300]}
            except FsrecryptError as exc:
                results[name] = {"ok": False, "detail": exc.message[:300]}
            except Exception as exc:  # noqa: BLE001 - a check reports, it does not crash
                results[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
            results[name]["at"] = time.time()
        failing = any(r["ok"] is False for r in results.values())
        if failing and not any(r.get("ok") is False for r in self.self_checks.values()):
            bad = {k: r["detail"] for k, r in results.items() if r["ok"] is False}
            self.rt.log.error("daemon.self_check_failed", **bad)
        self.self_checks = results
        self._next_self_check = time.monotonic() + (
            SELF_CHECK_RETRY if failing else SELF_CHECK_INTERVAL
        )

    def anchor_if_due(self) -> None:
        """Write an audit anchor when one is due (at most one check a minute).

        Every daemon and worker may run this: a PostgreSQL advisory lock lets
        one writer in, and the interval is read from the anchors themselves.
        A failure is logged and retried at the next check; it never stops
        the heartbeat.
        """
        rt = self.rt
        if not rt.config.audit.anchoring or time.monotonic() < self._next_anchor_check:
            return
        self._next_anchor_check = time.monotonic() + ANCHOR_CHECK_INTERVAL
        from fsrecrypt.lifecycle.anchors import anchor_if_due

        try:
            receipt = anchor_if_due(rt.services)
        except FsrecryptError as exc:
            rt.log.warning("daemon.anchor_failed", error=exc.one_line())
            return
        if receipt is not None:
            rt.log.info("daemon.anchor_written", seq=receipt.seq, sha256=receipt.sha256)

    def send_status_event(self, depth: int, age: float) -> bool:
        if self.events is None or not self.events.connected:
            return False
        counts = self.rt.counts
        headers = {
            "FSRecrypt-State": "stopping" if self.rt.stopping.is_set() else "running",
            "FSRecrypt-PID": str(os.getpid()),
            "FSRecrypt-Queue-Depth": str(depth),
            "FSRecrypt-Oldest-Pending-Seconds": f"{age:.0f}",
            "FSRecrypt-Stored": str(counts.get("stored", 0)),
            "FSRecrypt-Failed": str(counts.get("failed", 0)),
        }
        try:
            self.events.send_event(STATUS_SUBCLASS, headers)
        except (FsrecryptError, ValueError) as exc:
            self.rt.log.warning("daemon.status_event_failed", error=str(exc))
            return False
        return True

    def on_esl_state(self, state: str) -> None:
        """The EventSource's state callback: gauge, heartbeat now, status event on connect."""
        self.rt.metrics.esl_connected.set(1 if state == "connected" else 0)
        if state == "connected":
            self.esl_down_since = None
        elif self.esl_down_since is None:
            self.esl_down_since = time.time()
        if state in ("connected", "disconnected"):
            # `fsrecrypt health` reads the heartbeat: let it see the change now,
            # not at the next periodic write.
            self.write(esl_connected=state == "connected")
        if state == "connected" and self.events is not None:
            self.rt.metrics.reconnects.set(self.events.reconnects)
            gevent.spawn(self.send_status_event, self.jobs.depth(), 0.0)


# --- fsrecrypt health ----------------------------------------------------------------

HEALTHY, DEGRADED, DOWN = 0, 1, 2
LEVEL_NAME = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down"}


@dataclass
class Check:
    name: str
    level: int
    detail: str


def _check(name: str, fail_level: int, func: Callable[[], object]) -> Check:
    try:
        detail = func()
        return Check(name, HEALTHY, str(detail or "ok"))
    except FsrecryptError as exc:
        return Check(name, fail_level, exc.one_line())
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not crash
        return Check(name, fail_level, f"{type(exc).__name__}: {exc}")


def check_freeswitch(config: Config) -> str:
    """Connect, authenticate and ask ``api status``; the first line of the answer."""
    fs = config.freeswitch
    settings = EslSettings(
        host=fs.host,
        port=fs.port,
        password=fs.resolved_password(),
        connect_timeout=fs.connect_timeout,
        command_timeout=fs.command_timeout,
    )
    return probe_status(settings)


def check_heartbeat(config: Config) -> str:
    """The daemon's own word: alive, no dead greenlet, recent, and work moving."""
    path = config.metrics.heartbeat_file
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputFileError(
            f"no daemon heartbeat at {path}",
            hint="Start the daemon ('systemctl start fsrecrypt') and check its log.",
        ) from None
    failures = [f for f in doc.get("failures") or [] if isinstance(f, dict)]
    if doc.get("state") == "failed" or failures:
        names = ", ".join(str(f.get("greenlet"))[:40] for f in failures[:5]) or "unknown"
        first = str(failures[0].get("error", ""))[:200] if failures else ""
        raise InvalidState(
            f"daemon pid {doc.get('pid')} lost its {names} greenlet ({first}) and exits "
            "to be restarted",
            hint="Check the daemon's log (journalctl -u fsrecrypt) for the traceback.",
        )
    age = time.time() - float(doc.get("time", 0))
    if doc.get("state") != "running" or age > 6 * HEARTBEAT_INTERVAL:
        raise InputFileError(
            f"daemon heartbeat is {age:.0f}s old (state {doc.get('state')})",
            hint="The daemon is stopped or hung; check 'systemctl status fsrecrypt'.",
        )
    if not doc.get("progress_ok", True):
        raise InvalidState(
            "the daemon has a backlog but no job finished recently",
            hint="Check the daemon's log for a stuck upload.",
        )
    return f"pid {doc.get('pid')}, {age:.0f}s ago, esl " + (
        "connected" if doc.get("esl_connected") else "disconnected"
    )


def _heartbeat_doc(config: Config) -> dict[str, Any] | None:
    try:
        doc = json.loads(Path(config.metrics.heartbeat_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def check_daemon_access(config: Config) -> str:
    """Can the daemon itself use its keyring and write its store? (Its heartbeat says.)

    ``fsrecrypt health`` run as root can read a keyring the service user
    cannot: its own keys/store checks would say usable while every
    recording fails. This rates what the daemon's process found.
    """
    doc = _heartbeat_doc(config)
    if doc is None:
        return "skipped: no heartbeat (see the heartbeat check)"
    checks = doc.get("self_checks")
    if not isinstance(checks, dict) or not checks:
        return "not reported yet (heartbeat from another version, or the daemon is starting)"
    parts = []
    for name, error in (("keys", KeyAccessError), ("store", StorageError)):
        result = checks.get(name)
        if not isinstance(result, dict):
            continue
        detail = str(result.get("detail", ""))[:300]
        if result.get("ok") is False:
            what = "keyring/KMS" if name == "keys" else "store"
            raise error(
                f"the daemon (pid {str(doc.get('pid'))[:12]}) cannot use its {what}: {detail}",
                hint="Fix the owner and mode for the service user (every state file belongs "
                "to it; see 'Ownership' in the README), e.g. run 'sudo -u fsrecrypt fsrecrypt "
                "health' to see it as the daemon does; the daemon checks again within "
                f"{SELF_CHECK_RETRY:.0f}s.",
            )
        parts.append(f"{name}: {detail}" if result.get("ok") else f"{name} unknown: {detail}")
    return "; ".join(parts) or "not reported"


def check_daemon_view(config: Config) -> str:
    """What the daemon observes with its own rights: ESL link, dirs, failures, plaintext.

    ``fsrecrypt health`` may run as another user, with another password
    file: its own FreeSWITCH probe can succeed while the daemon is refused.
    Every problem found is named; the error's type is the first one's.
    """
    doc = _heartbeat_doc(config)
    if doc is None:
        return "skipped: no heartbeat (see the heartbeat check)"
    now = time.time()
    problems: list[FsrecryptError] = []
    unreadable = [str(d)[:300] for d in doc.get("unreadable_dirs") or []]
    if unreadable:
        problems.append(PathUnreadable(f"the daemon cannot list {', '.join(unreadable[:5])}"))
    failed = _number(doc.get("failed_since_store"))
    if failed:
        last = _number(doc.get("last_stored_at"))
        since = "it has stored none yet" if last is None else f"last store {now - last:.0f}s ago"
        problems.append(
            InvalidState(
                f"the daemon failed {failed:.0f} recording(s) since its last successful store "
                f"({since})",
                hint="See why with 'fsrecrypt recordings list --status failed' and the daemon's "
                "log (journalctl -p warning -u fsrecrypt).",
            )
        )
    oldest = _number(doc.get("oldest_plaintext_mtime"))
    limit = config.pipeline.quiet_period + max(PLAINTEXT_MARGIN, 2 * config.pipeline.sweep_interval)
    if oldest is not None and now - oldest > limit:
        problems.append(
            InvalidState(
                f"a plaintext recording has waited {now - oldest:.0f}s in the recordings "
                f"dirs (limit: quiet period + margin = {limit:.0f}s)",
                hint="List it with 'fsrecrypt recordings pending'; store it with "
                "'fsrecrypt ingest --tenant NAME FILE' or set [freeswitch] default_tenant.",
            )
        )
    since = doc.get("esl_down_since")
    esl = "esl connected"
    if since is not None:
        if not isinstance(since, int | float) or isinstance(since, bool):
            esl = "esl state unknown (heartbeat from another version?)"
        else:
            esl_limit = max(ESL_DOWN_LIMIT, 2 * config.freeswitch.backoff_cap)
            esl = f"esl down {now - since:.0f}s"
            if now - since > esl_limit:
                problems.append(
                    EslError(
                        f"the daemon has not been connected to FreeSWITCH for "
                        f"{now - since:.0f}s (limit {esl_limit:.0f}s)",
                        hint="Check the daemon's log (journalctl -p warning -u fsrecrypt) for "
                        "the reason, e.g. a refused ESL password",
                    )
                )
    if problems:
        first = problems[0]
        first.args = ("; ".join(p.message for p in problems),)
        raise first
    return esl


def run_health(config: Config) -> list[Check]:
    """Every check ``fsrecrypt health`` makes, in order; none raises."""
    services = Services(config)

    def database() -> str:
        return f"schema version {services.db.ping()}"

    def keys() -> str:
        tenants = services.db.tenants()
        for t in tenants:
            services.keys.check_key(t.kms_key_id)
            for ref in t.escrow_key_ids:
                services.escrow.check(ref)
        return f"{len(tenants)} tenant key(s) usable"

    def store() -> str:
        services.store.check()
        return f"{services.store.name} writable"

    def backlog() -> str:
        age = services.db.oldest_pending_age()
        limit = max(900.0, 3 * config.pipeline.sweep_interval)
        failed, next_retry = services.db.failed_summary()
        if age > limit:
            raise DatabaseError(
                f"oldest pending recording is {age:.0f}s old (limit {limit:.0f}s)",
                hint="Check the daemon's log for failing uploads or a stopped daemon.",
            )
        if failed:
            # Their plaintext is still on disk: not healthy until they are stored.
            when = (
                f"next automatic retry in {next_retry:.0f}s"
                if next_retry is not None
                else "no automatic retry scheduled"
            )
            raise InvalidState(
                f"{failed} failed recording(s) keep their plaintext; {when}",
                hint="See why with 'fsrecrypt recordings list --status failed', fix the cause, "
                "then run 'fsrecrypt retry --all' (or wait for the automatic retry).",
            )
        return f"oldest pending {age:.0f}s; failed 0"

    checks = [_check("freeswitch", DEGRADED, lambda: check_freeswitch(config))]
    checks.append(_check("database", DOWN, database))
    db_ok = checks[-1].level == HEALTHY
    skipped = "skipped: database unavailable"
    checks.append(_check("keys", DOWN, keys) if db_ok else Check("keys", DOWN, skipped))
    checks.append(_check("store", DOWN, store))
    checks.append(
        _check("backlog", DEGRADED, backlog) if db_ok else Check("backlog", DEGRADED, skipped)
    )
    checks.append(
        _check("masks", DEGRADED, lambda: check_masks(config, services))
        if db_ok
        else Check("masks", DEGRADED, skipped)
    )
    checks.append(_check("heartbeat", DOWN, lambda: check_heartbeat(config)))
    checks.append(_check("daemon", DEGRADED, lambda: check_daemon_view(config)))
    checks.append(_check("daemon-access", DOWN, lambda: check_daemon_access(config)))
    services.close()
    return checks


def overall_level(checks: list[Check]) -> int:
    """The worst level of ``checks`` (HEALTHY when there are none): the exit code."""
    return max((c.level for c in checks), default=HEALTHY)
