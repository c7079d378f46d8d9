"""``fsrecrypt backfill --detach`` worked by two ``fsrecrypt worker`` processes, one SIGKILLed.

The survivor must finish the dead worker's items (its job leases run out,
its recording claims are released as those of a dead process of this
host); every file stored once, every source gone, no object without a row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fsrecrypt.config import with_overrides
from tests.support.factories import make_wav, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fsrecrypt", "-c", str(config), "worker"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


def test_detached_backfill_worker_killed_survivor_finishes(local_services, tmp_path) -> None:
    services, tenant, archive = local_services
    files = {}
    for i in range(80):
        path = archive / f"{uuid.uuid4()}.wav"
        files[str(path)] = make_wav(path, 2.0, seed=i)
    config = with_overrides(
        services.config,
        jobs={
            "metrics_listen": "",
            "lease_seconds": 10,
            "heartbeat_interval": 2,
            "poll_interval": 0.5,
            "batch_size": 4,
            "concurrency": 2,
        },
    )
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsrecrypt",
            "-c",
            str(cfg),
            "backfill",
            str(archive),
            "--tenant",
            tenant.name,
            "--detach",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job"]
    assert services.db.job(job_id).total_items == 80

    doomed = _worker(cfg, tmp_path / "doomed.log")
    survivor = _worker(cfg, tmp_path / "survivor.log")
    try:
        deadline = time.monotonic() + 120
        while len(services.db.recordings(tenant_id=tenant.id, status=["stored"])) < 10:
            assert time.monotonic() < deadline, (tmp_path / "doomed.log").read_text()[-2000:]
            time.sleep(0.05)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(30)
        killed_at = time.monotonic()
        while services.db.job(job_id).active:
            assert time.monotonic() - killed_at < 120, (tmp_path / "survivor.log").read_text()
            time.sleep(0.2)
    finally:
        for proc in (doomed, survivor):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)

    job = services.db.job(job_id)
    assert job.state == "done", job.error
    # An item the killed worker stored but had not yet marked done is found
    # stored by the survivor ("already-stored"): counted once, stored once.
    counts = job.result["counts"]
    assert set(counts) <= {"stored", "already-stored"}, counts
    assert sum(counts.values()) == 80 and counts.get("already-stored", 0) <= 8, counts
    rows = services.db.recordings(tenant_id=tenant.id)
    assert sorted(r.source_path for r in rows) == sorted(files)
    assert all(r.status == "stored" for r in rows)
    assert [p for p in archive.iterdir()] == []
    assert sorted(services.store.list_keys("")) == sorted(r.s3_path for r in rows)
