"""Benchmark: the daemon (a real ``fsrecrypt run`` process) under a burst of RECORD_STOPs.

Cases, each a burst emitted as fast as the ESL replay server sends them:

* (a) 1000 recordings of 30 s, 8 kHz 16-bit mono WAV (480 kB each);
* (b) 50 recordings of 10 minutes (9.6 MB each).

Both run against the local keyring + local store and against moto S3 + KMS (a
moto server in its own process). Reported: recordings per second (first
RECORD_STOP to last stored row), RECORD_STOP-to-stored latency p50/p99 (event
emission time to the row's ``stored_at``), and the daemon's maximum RSS over
the burst. The baseline, measured in the same run against the same moto, is a
plain boto3 upload of the same files (``put_object`` / ``upload_file``) with
the same concurrency, all submitted at once; its latency is submission to
upload done, so queueing counts on both sides.

Targets (issue 3): >= 100 recordings/s for (a) on the local store; p99 with S3
<= 1.25x the plain upload's p99; daemon RSS < 200 MiB through the burst.

Run: ``.venv/bin/python bench/bench_daemon.py [--scale 0.1]`` (needs PostgreSQL
on 127.0.0.1:5432). ``FSRECRYPT_BENCH_SCALE`` scales the recording counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {"a_1000x30s": (1000, 30.0), "b_50x10min": (50, 600.0)}
CONCURRENCY = 8


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class Moto:
    """Just what tests.support.daemon.make_env needs from the moto fixture."""

    endpoint_url: str
    region: str
    process: subprocess.Popen[bytes]

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, region_name=self.region, endpoint_url=self.endpoint_url)


@dataclass
class Bucket:
    name: str


@contextlib.contextmanager
def moto_process() -> Iterator[Moto]:
    from tests.support.moto import _DUMMY_ENV, free_port

    os.environ.update(_DUMMY_ENV)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    try:
        yield Moto(url, "us-east-1", proc)
    finally:
        proc.terminate()
        proc.wait(10)


def wav_template(seconds: float) -> bytes:
    from tests.support.daemon import wav_bytes

    return wav_bytes(seconds)


def burst(env: Any, n: int, data: bytes, case: str) -> dict[str, Any]:
    """Write n files, start the daemon, emit n RECORD_STOPs, wait for every stored row."""
    directory = env.recordings / case
    directory.mkdir()
    paths = []
    for i in range(n):
        p = directory / f"{case}-{i:05d}.wav"
        p.write_bytes(data)
        paths.append(p)
    daemon = env.start(pipeline={"concurrency": CONCURRENCY, "quiet_period": 3600.0,
                                 "sweep_interval": 3600.0})
    rss_max = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal rss_max
        while not done.is_set():
            rss_max = max(rss_max, daemon.rss_kib())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    emitted: dict[str, float] = {}
    for p in paths:
        emitted[str(p)] = time.time()
        env.emit_stop(p)
    db = env.services().db
    deadline = time.monotonic() + 1800
    while True:
        rows = [r for r in db.recordings(status=["stored"]) if r.source_path in emitted]
        if len(rows) >= n:
            break
        if time.monotonic() > deadline or not daemon.alive():
            raise RuntimeError(f"{case}: only {len(rows)}/{n} stored\n{env.log_tail()}")
        time.sleep(0.2)
    done.set()
    sampler.join()
    daemon.terminate()
    first = min(emitted.values())
    latencies = [r.stored_at.timestamp() - emitted[r.source_path] for r in rows]
    last = max(r.stored_at.timestamp() for r in rows)
    return {
        "recordings": n,
        "recordings_per_s": round(n / (last - first), 2),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
        "daemon_rss_max_mib": round(rss_max / 1024, 1),
    }


def boto3_baseline(moto: Moto, n: int, data: bytes, tmp: Path, case: str) -> dict[str, Any]:
    """The same files uploaded with plain boto3 to the same moto, same concurrency."""
    s3 = moto.client("s3")
    bucket = f"baseline-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    directory = tmp / f"baseline-{case}"
    directory.mkdir()
    paths = []
    for i in range(n):
        p = directory / f"{i:05d}.wav"
        p.write_bytes(data)
        paths.append(p)

    def upload(p: Path) -> float:
        if len(data) < 8 * 1024 * 1024:
            with open(p, "rb") as f:
                s3.put_object(Bucket=bucket, Key=p.name, Body=f.read())
        else:
            s3.upload_file(str(p), bucket, p.name)
        return time.time()

    t0 = time.time()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        ends = list(pool.map(upload, paths))
    latencies = [e - t0 for e in ends]
    shutil.rmtree(directory)
    return {
        "recordings": n,
        "recordings_per_s": round(n / (max(ends) - t0), 2),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p99_s": round(percentile(latencies, 99), 3),
    }


def run(scale: float | None = None) -> dict[str, Any]:
    """Every case on both backends plus the boto3 baseline; prints and returns the figures."""
    from tests.support.daemon import make_env

    scale = float(os.environ.get("FSRECRYPT_BENCH_SCALE", "1")) if scale is None else scale
    results: dict[str, Any] = {}
    tmp_root = Path(tempfile.mkdtemp(prefix="fsrecrypt-bench-daemon-"))
    try:
        with moto_process() as moto:
            templates = {case: wav_template(sec) for case, (_n, sec) in CASES.items()}
            for backend in ("local", "s3"):
                tmp = tmp_root / backend
                tmp.mkdir()
                s3 = None
                if backend == "s3":
                    bucket = Bucket(f"bench-{uuid.uuid4().hex[:12]}")
                    moto.client("s3").create_bucket(Bucket=bucket.name)
                    s3 = (moto, bucket)
                with contextlib.contextmanager(make_env)(tmp, s3=s3) as env:
                    for case, (n, _sec) in CASES.items():
                        count = max(1, int(n * scale))
                        r = burst(env, count, templates[case], case)
                        results[f"{backend}/{case}"] = r
                        print(f"   {backend:5} {case:11} {r['recordings_per_s']:8.1f} rec/s  "
                              f"p50 {r['latency_p50_s']:7.3f}s  p99 {r['latency_p99_s']:7.3f}s  "
                              f"RSS max {r['daemon_rss_max_mib']:.0f} MiB", flush=True)
                        shutil.rmtree(env.tmp / "objects", ignore_errors=True)
                        (env.tmp / "objects").mkdir(exist_ok=True)
            for case, (n, _sec) in CASES.items():
                count = max(1, int(n * scale))
                r = boto3_baseline(moto, count, templates[case], tmp_root, case)
                results[f"boto3-baseline/{case}"] = r
                print(f"   boto3 {case:11} {r['recordings_per_s']:8.1f} rec/s  "
                      f"p50 {r['latency_p50_s']:7.3f}s  p99 {r['latency_p99_s']:7.3f}s",
                      flush=True)
                daemon_p99 = results[f"s3/{case}"]["latency_p99_s"]
                ratio = daemon_p99 / r["latency_p99_s"] if r["latency_p99_s"] else float("nan")
                results[f"s3/{case}"]["p99_vs_boto3"] = round(ratio, 2)
                print(f"   s3 p99 / boto3 p99 ({case}): {ratio:.2f} (target <= 1.25)")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=None,
                        help="multiply the recording counts (default 1, or $FSRECRYPT_BENCH_SCALE)")
    args = parser.parse_args()
    print(json.dumps(run(args.scale), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
