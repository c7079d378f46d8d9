"""Benchmark: /stream (decrypting, verifying) vs reading the object straight from the store.

One 60-minute recording (8 kHz 16-bit mono WAV, 57.6 MB) is ingested through
the real pipeline into S3 (a moto server in its own process) and, for
reference, the local store. Then, in the same run and against the same
object, a real `fsrecrypt serve` process is timed against the store client:

* full read: time to first byte and throughput of GET /stream vs a plain GET
  of the whole object;
* seek: time to first byte of GET /stream with ``Range: bytes=<middle>-`` vs a
  ranged GET of the ciphertext frames that hold that offset.

Targets (S3): seek first byte within 2x the raw ranged GET; full-read
throughput >= 80% of the raw GET's. Each figure is the median of a few runs.

Run: ``.venv/bin/python bench/bench_stream.py`` (needs PostgreSQL on
127.0.0.1:5432, like the tests).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADMIN_DSN = os.environ.get(
    "FSRECRYPT_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
MINUTES = int(os.environ.get("BENCH_STREAM_MINUTES", "60"))
REPEAT = int(os.environ.get("BENCH_STREAM_REPEAT", "5"))
RATE = 8000
READ = 256 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wav(minutes: int) -> bytes:
    n = minutes * 60 * RATE * 2
    pattern = os.urandom(1 << 16)
    samples = (pattern * (n // len(pattern) + 1))[:n]
    header = b"RIFF" + struct.pack("<I", 36 + n) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, RATE, RATE * 2, 2, 16)
    header += b"data" + struct.pack("<I", n)
    return header + samples


def _admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(ADMIN_DSN)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@contextmanager
def database() -> Iterator[str]:
    from fsrecrypt import db

    subprocess.run(["bash", str(ROOT / ".ci" / "ensure-postgres")], check=True)
    name = f"fsrecrypt_bench_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{name}"')
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    try:
        db.migrate(dsn)
        yield dsn
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def process(
    args: list[str], env: dict[str, str], ready: Callable[[], bool]
) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"{args[:4]} did not start:\n{log.read().decode()[-2000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far (Linux /proc).

    Split because the relay's costs differ in kind: user time is Python and
    AES, system time is the kernel moving the bytes in and out of sockets.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), to see who the cores serve."""
    return sum(cpu_split(pid))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            resp.read()
            return True
    except OSError:
        return False


def timed_store(chunks_factory: Callable[[], Iterator[bytes]]) -> tuple[float, float, int]:
    """(seconds to first byte, total seconds, bytes) reading a store iterator."""
    started = time.perf_counter()
    chunks = chunks_factory()
    first = None
    total = 0
    for chunk in chunks:
        if first is None:
            first = time.perf_counter() - started
        total += len(chunk)
    return first or 0.0, time.perf_counter() - started, total


def timed_http(port: int, path: str, headers: dict[str, str]) -> tuple[float, float, int, int]:
    """(seconds to first body byte, total seconds, bytes, status) of one GET on a new connection."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    first_chunk = resp.read1(READ) if hasattr(resp, "read1") else resp.read(1)
    first = time.perf_counter() - started
    total = len(first_chunk)
    while True:
        chunk = resp.read(READ)
        if not chunk:
            break
        total += len(chunk)
    elapsed = time.perf_counter() - started
    conn.close()
    return first, elapsed, total, resp.status


def config_file(sections: dict[str, dict[str, Any]], path: Path) -> tuple[Any, Path]:
    """The Config for ``sections``, and the same written as TOML for a child ``serve``."""
    from fsrecrypt.config import Config, with_overrides

    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return with_overrides(Config(), **sections), path


def bench_tenant(services: Any, prefix: str) -> tuple[str, str]:
    """A fresh tenant with its own key, and an API key for it (name, key)."""
    from fsrecrypt.web.auth import create_api_key

    tenant = f"{prefix}-{uuid.uuid4().hex[:6]}"
    services.db.add_tenant(tenant, services.keys.create_key(f"{prefix}-{uuid.uuid4().hex[:6]}"))
    _row, api_key = create_api_key(services, tenant, "bench")
    return tenant, api_key


def measure(
    backend: str, dsn: str, moto_url: str | None, workdir: Path, moto_pid: int | None = None
) -> dict[str, Any]:
    from fsrecrypt import format as esdk
    from fsrecrypt import pipeline

    sections: dict[str, dict[str, Any]] = {
        "database": {"dsn": dsn},
        "keys": {"provider": "local", "keyring": str(workdir / "keyring.json")},
        "storage": {"backend": "local", "path": str(workdir / f"objects-{backend}")},
        "playback": {"signing_key_file": str(workdir / "sign.key")},
        "logging": {"level": "warning"},
    }
    if backend == "s3":
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        import boto3

        boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(
            Bucket=bucket
        )
        sections["storage"] = {"backend": "s3", "bucket": bucket, "endpoint_url": moto_url or ""}
    config, cfg_path = config_file(sections, workdir / f"{backend}.toml")
    services = pipeline.Services(config)
    tenant, api_key = bench_tenant(services, f"bench-{backend}")
    src = workdir / "recordings" / f"{backend}.wav"
    src.parent.mkdir(exist_ok=True)
    data = wav(MINUTES)
    src.write_bytes(data)
    t0 = time.perf_counter()
    outcome = pipeline.ingest_file(services, str(src), tenant, user_id="bench")
    ingest_s = time.perf_counter() - t0
    rec = outcome.recording
    store = services.store
    key = rec.s3_path or ""
    opened = pipeline.open_recording(services, rec)
    middle = len(data) // 2
    plan = esdk.plan_range(opened.header, opened.object_size, middle, None)

    port = free_port()
    env = {**os.environ, "FSRECRYPT_CONFIG": str(cfg_path)}
    serve = [
        sys.executable,
        "-c",
        "from fsrecrypt.cli import main; main()",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
    ]
    path = f"/v1/recordings/{rec.id}/stream"
    auth = {"X-API-Key": api_key}
    results: dict[str, list[float]] = {
        k: []
        for k in (
            "raw_full_ttfb",
            "raw_full_mbps",
            "stream_full_ttfb",
            "stream_full_mbps",
            "raw_seek_ttfb",
            "stream_seek_ttfb",
        )
    }
    # CPU seconds per full read, by process: with 2 shared cores the sum over
    # moto, the server and the client bounds what the wall clock can reach.
    cpu: dict[str, list[float]] = {
        k: [] for k in ("raw_client", "raw_moto", "stream_client", "stream_serve", "stream_moto")
    }

    def moto_cpu() -> float:
        return cpu_seconds(moto_pid) if moto_pid is not None else 0.0

    # The server's user/system split, summed over all full reads: per-read
    # figures are at the clock tick's 10 ms resolution, the sum is not.
    serve_split = [0.0, 0.0]
    ready = lambda: _answers(f"http://127.0.0.1:{port}/v1/openapi.json")  # noqa: E731
    with process(serve, env, ready) as serve_proc:
        timed_http(port, path, {**auth, "Range": "bytes=0-1023"})  # warm-up
        for _ in range(REPEAT):
            c0, m0 = time.process_time(), moto_cpu()
            first, elapsed, n = timed_store(lambda: store.get_range(key, 0, None))
            cpu["raw_client"].append(time.process_time() - c0)
            cpu["raw_moto"].append(moto_cpu() - m0)
            assert n == opened.object_size
            results["raw_full_ttfb"].append(first)
            results["raw_full_mbps"].append(n / elapsed / 1e6)
            c0, m0, s0 = time.process_time(), moto_cpu(), cpu_split(serve_proc.pid)
            first, elapsed, n, status = timed_http(port, path, auth)
            s1 = cpu_split(serve_proc.pid)
            cpu["stream_client"].append(time.process_time() - c0)
            cpu["stream_moto"].append(moto_cpu() - m0)
            cpu["stream_serve"].append(sum(s1) - sum(s0))
            serve_split[0] += s1[0] - s0[0]
            serve_split[1] += s1[1] - s0[1]
            assert status == 200 and n == len(data), (status, n)
            results["stream_full_ttfb"].append(first)
            results["stream_full_mbps"].append(n / elapsed / 1e6)
            first, _e, _n = timed_store(
                lambda: store.get_range(key, plan.ciphertext_start, plan.ciphertext_end)
            )
            results["raw_seek_ttfb"].append(first)
            first, _e, n, status = timed_http(port, path, {**auth, "Range": f"bytes={middle}-"})
            assert status == 206 and n == len(data) - middle
            results["stream_seek_ttfb"].append(first)
    services.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "backend": backend,
        "recording_minutes": MINUTES,
        "plaintext_bytes": len(data),
        "object_bytes": opened.object_size,
        "ingest_s": round(ingest_s, 3),
        "raw_full_ttfb_ms": round(med["raw_full_ttfb"] * 1000, 2),
        "stream_full_ttfb_ms": round(med["stream_full_ttfb"] * 1000, 2),
        "raw_full_MBps": round(med["raw_full_mbps"], 1),
        "stream_full_MBps": round(med["stream_full_mbps"], 1),
        "full_throughput_ratio": round(med["stream_full_mbps"] / med["raw_full_mbps"], 3),
        "raw_seek_ttfb_ms": round(med["raw_seek_ttfb"] * 1000, 2),
        "stream_seek_ttfb_ms": round(med["stream_seek_ttfb"] * 1000, 2),
        "seek_ttfb_ratio": round(med["stream_seek_ttfb"] / med["raw_seek_ttfb"], 3),
        "cpu_ms_per_full_read": {k: round(statistics.median(v) * 1000, 1) for k, v in cpu.items()},
        "serve_cpu_ms_per_full_read_mean": {
            "user": round(serve_split[0] / REPEAT * 1000, 1),
            "system": round(serve_split[1] / REPEAT * 1000, 1),
        },
        "repeats": REPEAT,
    }


def run() -> dict[str, Any]:
    """Measure both stores; return the figures and whether the S3 targets are met."""
    workdir = Path(tempfile.mkdtemp(prefix="fsrecrypt-bench-stream-"))
    moto_port = free_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    moto_url = f"http://127.0.0.1:{moto_port}"
    moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)]
    results: dict[str, Any] = {}
    moto_ready = lambda: _answers(moto_url + "/moto-api/data.json")  # noqa: E731
    with database() as dsn, process(moto, env, moto_ready) as moto_proc:
        results["s3"] = measure("s3", dsn, moto_url, workdir, moto_proc.pid)
        results["local"] = measure("local", dsn, None, workdir)
    s3 = results["s3"]
    results["targets"] = {
        "s3_seek_ttfb_within_2x": s3["seek_ttfb_ratio"] <= 2.0,
        "s3_full_throughput_ge_80pct": s3["full_throughput_ratio"] >= 0.8,
    }
    for name in ("s3", "local"):
        r = results[name]
        print(
            f"[{name:5}] {MINUTES} min, {r['plaintext_bytes'] / 1e6:.1f} MB | full: raw "
            f"{r['raw_full_MBps']} MB/s (ttfb {r['raw_full_ttfb_ms']} ms) vs /stream "
            f"{r['stream_full_MBps']} MB/s (ttfb {r['stream_full_ttfb_ms']} ms) = "
            f"{r['full_throughput_ratio']:.0%} | seek ttfb: raw {r['raw_seek_ttfb_ms']} ms vs "
            f"/stream {r['stream_seek_ttfb_ms']} ms = {r['seek_ttfb_ratio']:.2f}x"
        )
    print("targets (S3):", json.dumps(results["targets"]))
    return results


if __name__ == "__main__":
    out = run()
    print(json.dumps(out, indent=2))
