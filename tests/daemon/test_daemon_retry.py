"""Nothing left behind: a failed recording is tried again on a schedule, with backoff.

Before, a row that reached ``failed`` (e.g. the daemon's keyring was
unusable) was never looked at again: its plaintext stayed on disk forever,
even after the cause was fixed; its failed attempts wrote no audit row, and
``fsrecrypt health`` rated it healthy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fsrecrypt.daemon import Daemon
from fsrecrypt.daemon.health import DEGRADED, run_health
from fsrecrypt.daemon.jobs import failed_retry_delay
from tests.support.factories import local_config, make_wav, unique


def _run_queued(daemon: Daemon) -> list[str]:
    """Run every queued job in this greenlet, as a worker would; their origins."""
    origins = []
    while not daemon.jobs.queue.empty():
        job = daemon.jobs.queue.get_nowait()
        origins.append(job.origin)
        if not daemon.runner.attempt(job):
            daemon.jobs.busy.discard(job.path)
    return origins


def test_failed_retry_delay_doubles_up_to_the_cap_and_can_be_off() -> None:
    assert failed_retry_delay(None, 600.0, 86400.0) == 600.0
    assert failed_retry_delay(600.0, 600.0, 86400.0) == 1200.0
    assert failed_retry_delay(2400.0, 600.0, 86400.0) == 4800.0
    assert failed_retry_delay(1e308, 600.0, 86400.0) == 86400.0  # huge waits stay bounded
    assert failed_retry_delay(float("nan"), 600.0, 86400.0) == 600.0
    assert failed_retry_delay(-5.0, 600.0, 86400.0) == 600.0
    assert failed_retry_delay(None, 0.0, 86400.0) is None


@pytest.mark.integration
def test_a_failed_recording_is_audited_reported_and_retried_once_the_cause_is_fixed(
    tmp_path: Path, pg_dsn: str
) -> None:
    tenant_name = unique("t")
    config = local_config(
        tmp_path,
        pg_dsn,
        pipeline={
            "quiet_period": 0.0,
            "max_attempts": 2,
            "retry_base": 0.01,
            "retry_cap": 0.02,
            "failed_retry_base": 0.5,
            "failed_retry_cap": 1.0,
        },
        freeswitch={"default_tenant": tenant_name, "host": "127.0.0.1", "port": 9},
    )
    daemon = Daemon(config)
    svc = daemon.services
    try:
        key = unique("k")
        svc.keys.create_key(key)
        svc.db.add_tenant(tenant_name, key)
        wav = tmp_path / "recordings" / "call.wav"
        make_wav(wav, 0.2, seed=4)
        old = time.time() - 60
        os.utime(wav, (old, old))
        keyring = Path(config.keys.keyring)
        keyring.chmod(0o644)  # the daemon refuses a keyring others can read

        assert daemon.sweeper.sweep()["adopted"] == 1
        _run_queued(daemon)
        (row,) = svc.db.recordings(source_path=str(wav))
        assert row.status == "failed"
        assert row.next_attempt_at is not None  # the automatic retry is scheduled
        assert daemon.sweeper.sweep()["resumed"] == 0  # not due yet: left alone
        assert wav.exists()
        audit = [a for a in svc.db.audit_rows(recording_id=row.id) if a["action"] == "encrypt"]
        assert audit and not audit[-1]["success"]
        assert "keyring" in (audit[-1]["error_message"] or "")

        backlog = {c.name: c for c in run_health(config)}["backlog"]
        assert backlog.level == DEGRADED
        assert "failed recording" in backlog.detail and "next automatic retry" in backlog.detail

        # Still broken when due: one attempt, then a longer wait (backoff).
        time.sleep(max(0.0, (row.next_attempt_at - row.updated_at).total_seconds()) + 0.1)
        assert daemon.sweeper.sweep()["resumed"] == 1
        assert _run_queued(daemon) == ["retry"]
        again = svc.db.recording(row.id)
        assert again.status == "failed" and again.attempts == row.attempts + 1
        assert again.next_attempt_at is not None
        waited = (again.next_attempt_at - again.updated_at).total_seconds()
        assert 0.9 <= waited <= 1.1  # 0.5 doubled, capped at 1.0
        failed_audit = [
            a
            for a in svc.db.audit_rows(recording_id=row.id)
            if a["action"] == "encrypt" and not a["success"]
        ]
        assert len(failed_audit) == again.attempts  # every failed attempt is on record

        # The operator fixes the keyring: the next scheduled retry stores it.
        keyring.chmod(0o600)
        time.sleep(1.1)
        assert daemon.sweeper.sweep()["resumed"] == 1
        assert _run_queued(daemon) == ["retry"]
        assert svc.db.recording(row.id).status == "stored"
        assert not wav.exists()
    finally:
        svc.close()
