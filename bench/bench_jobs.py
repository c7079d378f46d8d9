"""A job of 1,000,000 items: streamed creation, ``jobs show`` time, claim plan, worker RSS.

Targets (issue 8): creation streams (peak RSS of the creating process for
1,000,000 items about that for 10,000), claiming uses the partial index,
``fsrecrypt jobs show`` answers in under 1 s, a worker's RSS stays under
200 MiB. Baselines from the same run: the server inserting the same number
of rows with ``generate_series`` (what streaming costs over that), and
``SELECT count(*)`` over the items (the scan ``jobs show`` avoids).

Synthetic items: ``verify`` items naming no recording (each is skipped), so
the worker measures the framework, not decryption. Needs the PostgreSQL of
the tests (``FSRECRYPT_BENCH_ADMIN_DSN``, default 127.0.0.1:5432 as postgres);
it creates and drops a database of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[1]
ADMIN = os.environ.get("FSRECRYPT_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")

CREATE = """
import sys, uuid
from fsrecrypt.config import load_config
from fsrecrypt.pipeline import Services
from fsrecrypt.jobs import create_job
svc = Services(load_config(sys.argv[1]))
n = int(sys.argv[2])
items = ({"id": str(uuid.UUID(int=i + 1))} for i in range(n))
job = create_job(svc, "verify", {"user_id": "bench", "total_stored": 0}, items, user_id="bench")
print(job.id)
"""


def _admin(sql: str) -> None:
    conn = psycopg2.connect(ADMIN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _timed_sql(dsn: str, sql: str) -> float:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            started = time.perf_counter()
            cur.execute(sql)
            if cur.description:
                cur.fetchall()
            return time.perf_counter() - started
    finally:
        conn.close()


def _create(cfg: Path, n: int) -> tuple[int, float, float]:
    """(job id, seconds, peak RSS MiB of the creating process)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CREATE, str(cfg), str(n)], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("job creation failed")
    return int(out), time.perf_counter() - started, usage.ru_maxrss / 1024


def _cli(cfg: Path, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "fsrecrypt.cli", "-c", str(cfg), *args],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    return time.perf_counter() - started, run.stdout


def _worker_rss(cfg: Path, seconds: float) -> tuple[float, float]:
    """Run one worker for ``seconds``: (peak RSS MiB, items handled per second)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsrecrypt.cli", "-c", str(cfg), "worker"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    time.sleep(seconds)
    peak = 0.0
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    proc.terminate()
    proc.wait(60)
    return peak, 0.0


def run(n: int = 1_000_000, worker_seconds: float = 30.0) -> dict[str, float]:
    name = f"fsrecrypt_bench_jobs_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{name}"')
    dsn = ADMIN.rsplit("/", 1)[0] + "/" + name
    try:
        from fsrecrypt import db

        db.migrate(dsn)
        with tempfile.TemporaryDirectory(prefix="fsrecrypt-bench-jobs-") as tmp:
            cfg = Path(tmp) / "c.toml"
            cfg.write_text(
                f'[database]\ndsn = "{dsn}"\n[keys]\nkeyring = "{tmp}/kr.json"\n'
                f'[storage]\npath = "{tmp}/objects"\n'
                '[jobs]\nmetrics_listen = ""\nbatch_size = 100\nconcurrency = 4\n'
                '[logging]\nlevel = "warning"\n'
            )
            base_insert = _timed_sql(
                dsn,
                "CREATE TABLE bench_rows AS SELECT g AS seq,"
                f" jsonb_build_object('id', gen_random_uuid()) AS payload"
                f" FROM generate_series(1, {n}) g",
            )
            _small_id, _small_s, small_rss = _create(cfg, 10_000)
            job_id, big_s, big_rss = _create(cfg, n)
            _timed_sql(dsn, "ANALYZE job_items")
            count_scan = _timed_sql(dsn, f"SELECT count(*) FROM job_items WHERE job_id = {job_id}")
            from fsrecrypt.db import Database

            database = Database(dsn)
            queries = []
            for _ in range(5):
                started = time.perf_counter()
                database.job_status(job_id)
                queries.append(time.perf_counter() - started)
            database.close()
            show_query_s = sorted(queries)[2]
            show_s, _out = _cli(cfg, "jobs", "show", str(job_id))
            show_json_s, out = _cli(cfg, "jobs", "show", str(job_id), "--json")
            help_s, _ = _cli(cfg, "--help")
            counts = json.loads(out)["counts"]
            conn = psycopg2.connect(dsn)
            with conn, conn.cursor() as cur:
                cur.execute(
                    "EXPLAIN SELECT job_id, seq FROM job_items WHERE job_id = %s"
                    " AND state = 'queued' AND available_at <= now() ORDER BY job_id, seq"
                    " LIMIT 100 FOR UPDATE SKIP LOCKED",
                    (job_id,),
                )
                plan = " ".join(r[0] for r in cur.fetchall())
            conn.close()
            before = counts["done"] + counts["skipped"]
            started = time.perf_counter()
            worker_peak, _ = _worker_rss(cfg, worker_seconds)
            elapsed = time.perf_counter() - started
            _s, out = _cli(cfg, "jobs", "show", str(job_id), "--json")
            after = json.loads(out)["counts"]
            handled = after["done"] + after["skipped"] - before
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    result = {
        "items": n,
        "create_seconds": round(big_s, 1),
        "create_items_per_second": round(n / big_s),
        "create_vs_server_side_insert": round(big_s / base_insert, 1),
        "create_peak_rss_mib_n_items": round(big_rss, 1),
        "create_peak_rss_mib_10k": round(small_rss, 1),
        "create_rss_ratio_n_vs_10k": round(big_rss / small_rss, 2),
        "jobs_show_query_seconds_median": round(show_query_s, 4),
        "jobs_show_seconds": round(show_s, 3),
        "jobs_show_json_seconds": round(show_json_s, 3),
        "fsrecrypt_help_seconds_baseline": round(help_s, 3),
        "count_star_scan_seconds_baseline": round(count_scan, 3),
        "claim_uses_partial_index": float("job_items_queued" in plan),
        "worker_peak_rss_mib": round(worker_peak, 1),
        "worker_items_per_second": round(handled / elapsed),
    }
    for key, value in result.items():
        print(f"   {key}: {value}")
    print(
        f"   targets: jobs show < 1 s ({'ok' if show_s < 1 else 'MISSED'}), worker RSS < 200 MiB "
        f"({'ok' if worker_peak < 200 else 'MISSED'}), creation RSS flat "
        f"({'ok' if big_rss < small_rss + 16 else 'MISSED'})",
        flush=True,
    )
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--worker-seconds", type=float, default=30.0)
    args = parser.parse_args()
    run(args.items, args.worker_seconds)
