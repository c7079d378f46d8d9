"""PostgreSQL restarted in the middle of a job: the workers and the command reconnect and finish.

A PRIVATE cluster (``tests/support/pg_restartable.py``), never the shared one.
Two ``fsrecrypt worker`` processes and the ``rotate --rewrite-headers``
command that created the job work it; the cluster is restarted (fast shutdown:
every connection is cut) once
some items are done. The job must finish with every recording re-wrapped
exactly once, the command exiting 0 and both workers still running.
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

import psycopg2
import pytest

from fsrecrypt import db as dbmod
from fsrecrypt.config import load_config
from fsrecrypt.keys import LocalKeyring
from fsrecrypt.pipeline import Services, ingest_file
from tests.lifecycle.test_lifecycle import make_wav, write_config
from tests.support.pg_restartable import RestartablePostgres, restartable_pg  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _one(dsn: str, sql: str, params: tuple = ()) -> tuple:
    conn = psycopg2.connect(dsn, connect_timeout=2)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()
    finally:
        conn.close()


def test_workers_reconnect_after_postgresql_restarts_mid_job(
    tmp_path: Path,
    restartable_pg: RestartablePostgres,  # noqa: F811
) -> None:
    dsn = restartable_pg.create_database("fsrecrypt")
    dbmod.migrate(dsn)
    cfg = write_config(
        tmp_path,
        dsn,
        extra='[jobs]\nmetrics_listen = ""\nbatch_size = 2\nconcurrency = 1\npoll_interval = 0.3\n',
    )
    (tmp_path / "objects").mkdir()
    keyring = LocalKeyring(tmp_path / "keyring.json")
    keyring.create_key("old")
    keyring.create_key("new")
    services = Services(load_config(cfg))
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    services.db.add_tenant(tenant, "old")
    ids = []
    for i in range(50):
        wav = tmp_path / "in" / f"r{i}.wav"
        wav.parent.mkdir(exist_ok=True)
        make_wav(wav, 0.5, i)
        ids.append(ingest_file(services, str(wav), tenant, user_id="t").recording.id)
    services.close()

    logs = [open(tmp_path / f"worker{n}.log", "w") for n in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "fsrecrypt.cli", "-c", str(cfg), "worker"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for log in logs
    ]
    deadline = time.monotonic() + 60
    while not all("worker.started" in (tmp_path / f"worker{n}.log").read_text() for n in range(2)):
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    # The command works the job itself (attached) beside two workers.
    command = subprocess.Popen(
        [sys.executable, "-m", "fsrecrypt.cli", "-c", str(cfg), "rotate", "--tenant", tenant,
         "--to", "new", "--rewrite-headers"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while (job_id := _one(dsn, "SELECT max(id) FROM jobs")[0]) is None:
        assert time.monotonic() < deadline and command.poll() is None, "no job was created"
        time.sleep(0.05)
    state = None
    try:
        deadline = time.monotonic() + 120
        while _one(dsn, "SELECT coalesce(sum(done), 0) FROM job_counts WHERE job_id = %s",
                   (job_id,))[0] < 6:  # fmt: skip
            assert time.monotonic() < deadline, "no progress before the restart"
            time.sleep(0.05)
        restartable_pg.restart("fast")
        restarted_done = _one(
            dsn, "SELECT coalesce(sum(done), 0) FROM job_counts WHERE job_id = %s", (job_id,)
        )[0]
        assert restarted_done < len(ids), "the job finished before the restart: too fast"
        deadline = time.monotonic() + 180
        while state not in ("done", "failed"):
            assert time.monotonic() < deadline, "the job did not finish after the restart"
            for w in workers:
                assert w.poll() is None, (tmp_path / "worker0.log").read_text()[-3000:]
            try:
                (state,) = _one(dsn, "SELECT state FROM jobs WHERE id = %s", (job_id,))
            except psycopg2.OperationalError:
                pass
            time.sleep(0.2)
        assert state == "done", _one(
            dsn,
            "SELECT string_agg(message, ' | ') FROM job_items WHERE job_id = %s"
            " AND state = 'failed'",
            (job_id,),
        )
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        if command.poll() is None and state != "done":
            command.kill()
        for w in workers:
            w.wait(60)
        for log in logs:
            log.close()
    out, err = command.communicate(timeout=240)
    assert command.returncode == 0, err[-3000:]
    assert json.loads(out)["remaining"] == 0
    assert all(w.returncode == 0 for w in workers)
    text = "".join((tmp_path / f"worker{n}.log").read_text() for n in range(2))
    assert "worker.loop_pass_failed" in text or "database unavailable" in text
    services = Services(load_config(cfg))
    try:
        tenant_id = services.db.tenant_by_name(tenant).id
        rows = services.db.audit_rows(tenant_id=tenant_id, action="rotate")
        rewraps = [
            r["recording_id"] for r in rows if (r.get("details") or {}).get("step") == "rewrap"
        ]
        assert sorted(rewraps) == sorted(ids)
        assert all(services.db.recording(i).kms_key_id == "new" for i in ids)
        result = services.db.job(job_id).result or {}
        assert result.get("remaining") == 0 and result.get("failures") == {}
    finally:
        services.close()
