"""One `fsrecrypt worker`: metrics, log lines, anchors, SIGTERM drain; the jobs commands."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.config import load_config
from fsrecrypt.jobs import create_job
from fsrecrypt.lifecycle.anchors import parse_anchor
from fsrecrypt.pipeline import Services
from tests.lifecycle.test_lifecycle import ROOT, World, world  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _json_lines(path) -> list[dict]:
    """The log's JSON lines (a warning from a library may go to stderr as plain text)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _verify_job(svc: Services, n: int) -> int:
    items = ({"id": str(uuid.uuid4())} for _ in range(n))
    return create_job(svc, "verify", {"user_id": "t"}, items, user_id="t").id


def test_worker_logs_each_item_serves_metrics_anchors_and_drains_on_sigterm(
    world: World,  # noqa: F811
) -> None:
    port = _free_port()
    anchors = world.tmp / "anchors"
    with world.cfg.open("a") as f:
        f.write(
            f'[jobs]\nmetrics_listen = "127.0.0.1:{port}"\nbatch_size = 50\nconcurrency = 1\n'
            "poll_interval = 0.2\n"
            f'[audit]\nanchor_dir = "{anchors}"\n'
            f'anchor_key_file = "{world.tmp / "secrets" / "anchor.key"}"\nanchor_interval = 60.0\n'
        )
    svc = Services(load_config(world.cfg))
    small = _verify_job(svc, 5)
    log = open(world.tmp / "worker.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsrecrypt.cli", "-c", str(world.cfg), "worker"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while svc.db.job(small).state != "done":
            assert proc.poll() is None and time.monotonic() < deadline, (
                world.tmp / "worker.log"
            ).read_text()
            time.sleep(0.1)
        lines = _json_lines(world.tmp / "worker.log")
        # (The session's database may hold other tests' jobs: the worker takes those too.)
        items = [x for x in lines if x.get("event") == "job_item" and x["job"] == small]
        assert sorted(x["seq"] for x in items) == [1, 2, 3, 4, 5]
        assert {x["state"] for x in items} == {"skipped"}
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = body.decode()
        found = re.search(r'fsrecrypt_job_items_total\{kind="verify",state="skipped"\} (\d+)', text)
        assert found and int(found.group(1)) >= 5, text
        for name in ("fsrecrypt_job_items_in_flight", "fsrecrypt_job_lag_seconds"):
            assert name in text
        # Workers anchor the audit chains too (advisory-locked with the daemons).
        deadline = time.monotonic() + 60
        while not (anchors / "000000000001.json").exists():
            assert time.monotonic() < deadline, (world.tmp / "worker.log").read_text()[-2000:]
            time.sleep(0.2)
        assert parse_anchor((anchors / "000000000001.json").read_bytes())["seq"] == 1
        # A big job: SIGTERM while it works hands the unstarted items back at once.
        big = _verify_job(svc, 3000)
        deadline = time.monotonic() + 60
        while svc.db.job_counts(big)["skipped"] < 20:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    counts = svc.db.job_counts(big)
    assert counts["running"] == 0, counts  # nothing left leased by the stopped worker
    assert counts["queued"] > 0 and counts["skipped"] + counts["queued"] == 3000
    text = (world.tmp / "worker.log").read_text()
    assert "worker.stopping" in text and "worker.stopped" in text
    svc.db.cancel_job(big)  # leave nothing for later tests' workers
    svc.close()


def test_jobs_commands_list_show_cancel_retry_and_detach(world: World) -> None:  # noqa: F811
    ids = world.ingest(3)

    def cli(*args: str):
        return CliRunner().invoke(main, ["-c", str(world.cfg), *args], catch_exceptions=False)

    detached = cli("verify", "--tenant", world.tenant, "--detach")
    assert detached.exit_code == 0, detached.output
    info = json.loads(detached.stdout)
    assert info["detached"] and info["items"] == 3 and info["kind"] == "verify"
    job_id = info["job"]
    listed = cli("jobs", "list", "--active")
    assert any(line.split("\t")[:3] == [str(job_id), "verify", "running"] for line in
               listed.stdout.splitlines())  # fmt: skip
    shown = cli("jobs", "show", str(job_id))
    assert "3 total, 3 queued, 0 running, 0 done" in shown.stdout
    assert json.loads(cli("jobs", "cancel", str(job_id)).stdout)["state"] == "cancelled"
    again = cli("jobs", "cancel", str(job_id))
    assert again.exit_code != 0 and "not running" in again.stderr
    retried = json.loads(cli("jobs", "retry", str(job_id)).stdout)
    assert retried == {"job": job_id, "state": "running", "requeued": 0}
    # Damage one object: the worker-less job, worked by a later command, names it.
    obj = world.store_root / world.row(ids[0]).s3_path
    obj.write_bytes(obj.read_bytes()[:-10])
    services = world.services
    from fsrecrypt.jobs import run_job

    final = run_job(services, job_id)
    assert final.state == "failed"
    status = json.loads(cli("jobs", "show", str(job_id), "--json").stdout)
    assert status["counts"]["done"] == 2 and status["counts"]["failed"] == 1
    assert status["first_failures"][0]["payload"] == {"id": ids[0]}
    missing = cli("jobs", "show", "999999999")
    assert missing.exit_code != 0 and "no job with id 999999999" in missing.stderr
    for hostile in ("-1", "0", "9223372036854775808", "1e3", "1;DROP TABLE jobs"):
        bad = cli("jobs", "show", hostile)
        assert bad.exit_code == 2 and "Traceback" not in bad.output, hostile
    biggest = cli("jobs", "cancel", "9223372036854775807")
    assert biggest.exit_code != 0 and "no job with id" in biggest.stderr
