"""Benchmark: ``fsrecrypt backfill`` against the daemon, and its scale-out across workers.

* (a) local: 2,000 x 30 s WAVs (8 kHz 16-bit mono, 480 kB each) from a local
  directory to the local store with ``fsrecrypt backfill DIR --tenant T``
  (the command works its own job, with the read-back verification), against
  the daemon storing the same files from a burst of RECORD_STOPs
  (``bench_daemon.burst``), both measured in this run on the same database,
  keyring and store, both working 8 recordings at once (the daemon's
  ``[pipeline] concurrency``, the command's ``--concurrency``), alternating
  ``--rounds`` times. Target: backfill >= 80% of the daemon's recordings/s.
  Backfill rate = files / the command's whole wall time (start-up, listing,
  job creation and summary included); the daemon's = files / first
  RECORD_STOP to last stored row (its start-up excluded).
* (b) S3: source bucket and target store (and KMS) on moto behind a TCP proxy
  that holds every request 20 ms (like real S3 first-byte latency). The
  same number of objects is backfilled by 1 ``fsrecrypt worker`` and then by
  3 (``--detach`` job, time from the first item finished to the last), each
  worker taking one item at a time (``[jobs] concurrency = 1``, batches of
  2) so the ratio is scale-out across processes alone. Target: 3 workers
  >= 2x faster than 1. CPU per object of the workers and of moto is printed:
  on 2 cores shared with moto and PostgreSQL, CPU caps the ratio.

Run: ``.venv/bin/python bench/bench_backfill.py [--scale 0.25] [--case local|s3] [--rounds 2]``.
``FSRECRYPT_BENCH_SCALE`` scales the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_daemon import (  # noqa: E402
    CONCURRENCY,
    Bucket,
    burst,
    cpu_seconds,
    moto_process,
    wav_template,
)

LOCAL_FILES = 2000
S3_OBJECTS = 240
S3_SECONDS = 10.0
PROXY_DELAY = 0.020


class DelayProxy:
    """A TCP proxy that holds each request ``delay`` seconds before passing it on.

    A request is the first client bytes after the server last spoke (HTTP
    keep-alive: request, response, request...), so every S3/KMS call pays the
    delay once (an ``Expect: 100-continue`` upload pays it twice, as it pays
    a round trip for real).
    """

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        waiting = [True]

        def pump(src: socket.socket, dst: socket.socket, from_client: bool) -> None:
            try:
                while data := src.recv(262144):
                    if from_client and waiting[0]:
                        waiting[0] = False
                        self.requests += 1
                        time.sleep(self.delay)
                    elif not from_client:
                        waiting[0] = True
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        other = threading.Thread(target=pump, args=(server, client, False), daemon=True)
        other.start()
        pump(client, server, True)
        other.join()
        client.close()
        server.close()

    def close(self) -> None:
        self._sock.close()


def _fsrecrypt(config: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fsrecrypt", "-c", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        **kw,
    )


def _backfill_once(env: Any, n: int, data: bytes, tag: str) -> dict[str, Any]:
    """``fsrecrypt backfill`` of n copies of ``data`` (a fresh directory), timed whole."""
    archive = env.tmp / f"archive-{tag}"
    for i in range(n):
        sub = archive / f"day{i % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{uuid.uuid4()}.wav").write_bytes(data)
    started = time.monotonic()
    out = _fsrecrypt(
        env.write_config(),
        "backfill",
        str(archive),
        "--tenant",
        env.tenant,
        "--concurrency",
        str(CONCURRENCY),
        timeout=3600,
    )
    wall = time.monotonic() - started
    if out.returncode != 0:
        raise RuntimeError(f"backfill failed: {out.stderr[-2000:]}")
    with env.services().db.transaction("bench") as cur:
        cur.execute(
            "SELECT extract(epoch FROM max(stored_at) - min(stored_at)) FROM"
            " call_recordings WHERE source_path LIKE %s",
            (str(archive) + "/%",),
        )
        span = float(cur.fetchone()[0] or 0)
    return {
        "recordings": n,
        "stored": json.loads(out.stdout)["counts"].get("stored", 0),
        "recordings_per_s": round(n / wall, 2),
        "recordings_per_s_first_to_last_stored": round(n / span, 2) if span else None,
        "wall_s": round(wall, 2),
    }


def local_case(scale: float, rounds: int = 1) -> dict[str, Any]:
    """Daemon, then backfill, ``rounds`` times on one environment; the ratio of the totals.

    Alternating rounds spread the load other processes put on a shared
    machine over both sides.
    """
    from tests.support.daemon import make_env

    n = max(1, int(LOCAL_FILES * scale))
    data = wav_template(30.0)
    tmp = Path(tempfile.mkdtemp(prefix="fsrecrypt-bench-backfill-"))
    runs: list[dict[str, Any]] = []
    try:
        with contextlib.contextmanager(make_env)(tmp) as env:
            for r in range(rounds):
                daemon = burst(env, n, data, f"daemon{r}")
                shutil.rmtree(env.tmp / "objects", ignore_errors=True)
                (env.tmp / "objects").mkdir()
                backfill = _backfill_once(env, n, data, str(r))
                shutil.rmtree(env.tmp / "objects", ignore_errors=True)
                (env.tmp / "objects").mkdir()
                ratio = backfill["recordings_per_s"] / daemon["recordings_per_s"]
                runs.append({"daemon": daemon, "backfill": backfill, "ratio": round(ratio, 3)})
                print(
                    f"   local  round {r + 1}: daemon {daemon['recordings_per_s']:7.1f} rec/s   "
                    f"backfill {backfill['recordings_per_s']:7.1f} rec/s (whole command; "
                    f"{backfill['recordings_per_s_first_to_last_stored']} first-to-last stored)"
                    f"   ratio {ratio:.2f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    daemon_s = sum(n / run["daemon"]["recordings_per_s"] for run in runs)
    backfill_s = sum(run["backfill"]["wall_s"] for run in runs)
    ratio = daemon_s / backfill_s
    print(f"   local  backfill / daemon over {rounds} round(s): {ratio:.2f} (target >= 0.80)")
    return {"rounds": runs, "ratio": round(ratio, 3)}


def _fill_bucket(client: Any, bucket: str, n: int, seconds: float, tag: str) -> None:
    from tests.support.daemon import wav_bytes

    for _ in range(n):
        client.put_object(Bucket=bucket, Key=f"{tag}/{uuid.uuid4()}.wav", Body=wav_bytes(seconds))


def _job_seconds(db: Any, job_id: int, timeout: float = 3600) -> tuple[float, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        job = db.job(job_id)
        if not job.active:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish")
        time.sleep(0.2)
    with db.transaction("bench") as cur:
        cur.execute(
            "SELECT extract(epoch FROM max(finished_at) - min(finished_at)),"
            " (SELECT count(*) FROM job_items WHERE job_id = %s AND state = 'done')"
            " FROM job_items WHERE job_id = %s",
            (job_id, job_id),
        )
        span, done = cur.fetchone()
    return float(span or 0), {"state": job.state, "done": int(done)}


@contextlib.contextmanager
def _workers(config: Path, count: int, log: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    with open(log, "ab") as out:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fsrecrypt", "-c", str(config), "worker"],
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


@contextlib.contextmanager
def _moto() -> Iterator[Any]:
    """``bench_daemon.moto_process``, killed if it does not stop in time (a loaded machine)."""
    manager = moto_process()
    moto = manager.__enter__()
    try:
        yield moto
    finally:
        try:
            manager.__exit__(None, None, None)
        except subprocess.TimeoutExpired:
            moto.process.kill()
            moto.process.wait(30)


def s3_case(scale: float, concurrency: int) -> dict[str, Any]:
    from tests.support.daemon import make_env

    n = max(3, int(S3_OBJECTS * scale))
    tmp = Path(tempfile.mkdtemp(prefix="fsrecrypt-bench-backfill-s3-"))
    results: dict[str, Any] = {"objects": n, "object_seconds": S3_SECONDS}
    try:
        with _moto() as moto:
            host, port = moto.endpoint_url.rsplit(":", 1)
            proxy = DelayProxy((host.split("//")[1], int(port)), PROXY_DELAY)
            s3 = moto.client("s3")
            target = Bucket(f"bench-target-{uuid.uuid4().hex[:8]}")
            source = f"bench-source-{uuid.uuid4().hex[:8]}"
            s3.create_bucket(Bucket=target.name)
            s3.create_bucket(Bucket=source)
            s3.put_bucket_versioning(Bucket=source, VersioningConfiguration={"Status": "Enabled"})
            with contextlib.contextmanager(make_env)(tmp, s3=(moto, target)) as env:
                overrides = {
                    "storage": {"endpoint_url": proxy.url},
                    "keys": {"endpoint_url": proxy.url},
                    "jobs": {"concurrency": concurrency, "batch_size": 2, "metrics_listen": ""},
                }
                config = env.write_config(**overrides)
                db = env.services().db
                for workers in (1, 3):
                    tag = f"w{workers}"
                    _fill_bucket(s3, source, n, S3_SECONDS, tag)
                    out = _fsrecrypt(
                        config,
                        "backfill",
                        f"s3://{source}/{tag}/",
                        "--tenant",
                        env.tenant,
                        "--source-endpoint-url",
                        proxy.url,
                        "--source-region",
                        moto.region,
                        "--detach",
                        timeout=600,
                    )
                    if out.returncode != 0:
                        raise RuntimeError(f"backfill --detach failed: {out.stderr[-2000:]}")
                    job_id = int(json.loads(out.stdout)["job"])
                    before = proxy.requests
                    moto_cpu = cpu_seconds(moto.process.pid)
                    with _workers(config, workers, tmp / f"workers-{workers}.log") as procs:
                        seconds, state = _job_seconds(db, job_id)
                        worker_cpu = sum(cpu_seconds(p.pid) for p in procs)
                    moto_cpu = cpu_seconds(moto.process.pid) - moto_cpu
                    results[f"workers_{workers}"] = {
                        "seconds": round(seconds, 2),
                        "objects_per_s": round(n / seconds, 2) if seconds else None,
                        "proxied_requests_per_object": round((proxy.requests - before) / n, 1),
                        "cpu_ms_per_object_workers": round(worker_cpu * 1000 / n, 1),
                        "cpu_ms_per_object_moto": round(moto_cpu * 1000 / n, 1),
                        **state,
                    }
                    print(
                        f"   s3     {workers} worker(s) x {concurrency} at once: "
                        f"{seconds:6.1f} s for {n} objects "
                        f"({results[f'workers_{workers}']['proxied_requests_per_object']} "
                        f"proxied requests each; CPU/object workers "
                        f"{results[f'workers_{workers}']['cpu_ms_per_object_workers']} ms, moto "
                        f"{results[f'workers_{workers}']['cpu_ms_per_object_moto']} ms), {state}",
                        flush=True,
                    )
            proxy.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one, three = results["workers_1"]["seconds"], results["workers_3"]["seconds"]
    results["speedup_3_vs_1"] = round(one / three, 2) if three else None
    print(f"   s3     3 workers vs 1: {results['speedup_3_vs_1']}x faster (target >= 2)")
    return results


def run(
    scale: float | None = None, cases: tuple[str, ...] = ("local", "s3"), rounds: int = 1
) -> dict[str, Any]:
    scale = float(os.environ.get("FSRECRYPT_BENCH_SCALE", "1")) if scale is None else scale
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg()}
    if "local" in cases:
        results["local"] = local_case(scale, rounds)
    if "s3" in cases:
        results["s3"] = s3_case(scale, concurrency=1)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=None)
    parser.add_argument("--case", choices=("local", "s3"), action="append")
    parser.add_argument("--rounds", type=int, default=1, help="daemon/backfill rounds (local)")
    args = parser.parse_args()
    cases = tuple(args.case or ("local", "s3"))
    print(json.dumps(run(args.scale, cases, args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
