"""``fsrecrypt worker`` processes and a ``rotate`` command sharing one job; one worker SIGKILLed.

Real PostgreSQL, the local keyring and store, real subprocesses. Every
recording must be re-wrapped exactly once (one ``rewrap`` audit row each),
and the items the killed worker held must be done by the others within 60 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from tests.lifecycle.test_lifecycle import ROOT, World, world  # noqa: F401 - fixture

JOBS_CONFIG = '[jobs]\nmetrics_listen = ""\nbatch_size = 5\nconcurrency = 2\npoll_interval = 0.2\n'


def _spawn_worker(cfg: Path) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsrecrypt.cli", "-c", str(cfg), "worker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _query(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.slow
def test_three_workers_and_rotate_one_killed_every_recording_rewrapped_once(
    world: World,  # noqa: F811
) -> None:
    with world.cfg.open("a") as f:
        f.write(JOBS_CONFIG)
    ids = world.ingest(100, seconds=0.3)
    workers = [_spawn_worker(world.cfg) for _ in range(3)]
    try:
        for proc, lines in workers:
            deadline = time.monotonic() + 60
            while not any("worker.started" in line for line in lines):
                assert proc.poll() is None, "".join(lines)
                assert time.monotonic() < deadline, "".join(lines)
                time.sleep(0.05)
        rotate = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fsrecrypt.cli",
                "-c",
                str(world.cfg),
                "rotate",
                "--tenant",
                world.tenant,
                "--to",
                "new",
                "--rewrite-headers",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        # Kill the first worker to finish an item: it holds the rest of its batch
        # (and its other loop's batch) under leases.
        deadline = time.monotonic() + 90
        index = None
        while index is None:
            assert time.monotonic() < deadline and rotate.poll() is None, "no worker took an item"
            for n, (_proc, lines) in enumerate(workers):
                if any('"job_item"' in line for line in lines):
                    index = n
            time.sleep(0.005)
        victim, victim_lines = workers.pop(index)
        worker_id = json.loads(next(x for x in victim_lines if '"job_item"' in x))["worker"]
        os.kill(victim.pid, signal.SIGKILL)
        ((killed_at,),) = _query(world.dsn, "SELECT now()")
        victim.wait(10)
        orphaned = _query(
            world.dsn,
            "SELECT job_id, seq FROM job_items WHERE claimed_by = %s AND state = 'running'",
            (worker_id,),
        )
        out, err = rotate.communicate(timeout=180)
        assert rotate.returncode == 0, err
        summary = json.loads(out)
        assert summary["remaining"] == 0 and summary["failures"] == {}
        for job_id, seq in orphaned:
            ((state, after),) = _query(
                world.dsn,
                "SELECT state, extract(epoch FROM finished_at - %s) FROM job_items"
                " WHERE job_id = %s AND seq = %s",
                (killed_at, job_id, seq),
            )
            assert state == "done" and float(after) < 60
    finally:
        for proc, _lines in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, lines in workers:
            if proc.returncode == -9:
                continue
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail("a worker did not drain on SIGTERM: " + "".join(lines[-5:]))
    for proc, _lines in workers:
        assert proc.returncode == 0
    # Exactly once: one rewrap audit row per recording, every row on the new key.
    tenant_id = world.services.db.tenant_by_name(world.tenant).id
    rows = world.services.db.audit_rows(tenant_id=tenant_id, action="rotate")
    rewraps = [r["recording_id"] for r in rows if (r.get("details") or {}).get("step") == "rewrap"]
    assert sorted(rewraps) == sorted(ids)
    for rec_id in ids:
        row = world.row(rec_id)
        assert row.kms_key_id == "new"
    for rec_id in ids[:5]:
        assert world.decrypt_via_db(rec_id) == world.originals[rec_id]
    assert world.objects() == sorted(world.row(i).s3_path for i in ids)
    # Others (not only the command) did work: the survivors logged items.
    assert orphaned, "the victim held no item when killed"
    assert any('"job_item"' in x for x in workers[0][1] + workers[1][1])
