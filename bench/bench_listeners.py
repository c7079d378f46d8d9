"""Benchmark: many listeners at once on one ``fsrecrypt serve`` (S3 on a moto server).

500 clients (``BENCH_LISTENERS_CLIENTS``) for 60 s (``BENCH_LISTENERS_SECONDS``),
each playing a different recording the way a player does: a ranged GET from
a random offset (a seek), reading what it asked for, then a pause of 2-5 s
before the next seek. Each client keeps its connection alive.

Baseline, in the same run and under the same load: right after each seek,
the same client makes a raw ranged GET (boto3, signed, against the same moto
server) of exactly the ciphertext frames the seek needed. Reported: the
p50/p99 time to first byte of both, their ratio (target: p99 after a seek
<= 2x the raw ranged GET's), the errors (target: none) and the server's RSS
sampled every second (target: flat, the last 10 s within 10% of the 10 s
after warm-up).

Warm-up: the clients start within 2 s of each other, and each one's first
seek finds its recording cold (the server reads the object header, and every
connection is new). That thundering herd saturates the one moto process for
a few seconds, delaying every request behind it. The 60 s are measured
after a warm-up of ``BENCH_LISTENERS_WARMUP`` seconds (default 10) in which
the clients already play; the warm-up's own seeks are reported apart, not
hidden. Errors count over the whole run.

The clients run in a child process of their own (gevent, monkey-patched;
this process stays unpatched for the other benchmarks). On a shared, loaded
machine the absolute figures mean little: the ratio is the figure.

Run: ``.venv/bin/python bench/bench_listeners.py`` (needs PostgreSQL on
127.0.0.1:5432, like the tests).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["--client"]:
    from gevent import monkey

    monkey.patch_all()

import http.client
import json
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIENTS = int(os.environ.get("BENCH_LISTENERS_CLIENTS", "500"))
SECONDS = float(os.environ.get("BENCH_LISTENERS_SECONDS", "60"))
RECORDING_SECONDS = int(os.environ.get("BENCH_LISTENERS_RECORDING_SECONDS", "60"))
SEEKS_PER_RECORDING = 40
READ_BYTES = 32 * 1024  # two seconds of 8 kHz 16-bit audio after each seek
PAUSE = (2.0, 5.0)
WARMUP = float(os.environ.get("BENCH_LISTENERS_WARMUP", "10"))
RATE = 8000


def _wav(seconds: int, seed: int) -> bytes:
    import struct

    n = seconds * RATE * 2
    block = random.Random(seed).randbytes(1 << 14)
    samples = (block * (n // len(block) + 1))[:n]
    header = b"RIFF" + struct.pack("<I", 36 + n) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, RATE, RATE * 2, 2, 16)
    header += b"data" + struct.pack("<I", n)
    return header + samples


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- the clients (child process, gevent) ---------------------------------------------------------


def client_main(spec: dict[str, Any]) -> None:
    import boto3
    import gevent
    from botocore.config import Config as BotoConfig

    s3 = boto3.client(
        "s3",
        endpoint_url=spec["moto_url"],
        region_name="us-east-1",
        config=BotoConfig(max_pool_connections=spec["clients"] + 50, retries={"max_attempts": 1}),
    )
    stream_ttfb: list[float] = []
    raw_ttfb: list[float] = []
    errors: list[str] = []
    seeks = [0]
    requests = [0]
    warm_stream: list[float] = []
    warm_raw: list[float] = []
    start_at = time.monotonic() + spec["warmup"]
    stop_at = start_at + spec["seconds"]

    def listener(index: int, rec: dict[str, Any]) -> None:
        rng = random.Random(index)
        conn = http.client.HTTPConnection("127.0.0.1", spec["port"], timeout=60)
        headers = {"X-API-Key": spec["api_key"]}
        path = f"/v1/recordings/{rec['id']}/stream"
        warm = True
        gevent.sleep(rng.uniform(0, 2.0))  # players do not all start in the same millisecond
        while time.monotonic() < stop_at:
            start, cstart, cend = rng.choice(rec["seeks"])
            end = min(start + READ_BYTES, rec["size"]) - 1
            try:
                t0 = time.perf_counter()
                conn.request("GET", path, headers={**headers, "Range": f"bytes={start}-{end}"})
                resp = conn.getresponse()
                first = resp.read(1)
                ttfb = time.perf_counter() - t0
                rest = resp.read()
                requests[0] += 1
                if resp.status != 206 or len(first) + len(rest) != end - start + 1:
                    errors.append(f"status {resp.status}, {len(first) + len(rest)} bytes")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", spec["port"], timeout=60)
                t1 = time.perf_counter()
                body = s3.get_object(
                    Bucket=spec["bucket"], Key=rec["key"], Range=f"bytes={cstart}-{cend - 1}"
                )["Body"]
                body.read(1)
                raw = time.perf_counter() - t1
                body.read()
                body.close()
            except Exception as exc:  # every failure is an error to report
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", spec["port"], timeout=60)
                gevent.sleep(1.0)
                continue
            if not warm and time.monotonic() >= start_at:
                stream_ttfb.append(ttfb)
                raw_ttfb.append(raw)
                seeks[0] += 1
            elif not warm:
                warm_stream.append(ttfb)
                warm_raw.append(raw)
            warm = False
            gevent.sleep(rng.uniform(*PAUSE))
        conn.close()

    greenlets = [
        gevent.spawn(listener, i, spec["recordings"][i % len(spec["recordings"])])
        for i in range(spec["clients"])
    ]
    gevent.joinall(greenlets, timeout=spec["warmup"] + spec["seconds"] + 120)
    print(
        json.dumps(
            {
                "stream_ttfb": stream_ttfb,
                "raw_ttfb": raw_ttfb,
                "warmup_stream_ttfb": warm_stream,
                "warmup_raw_ttfb": warm_raw,
                "errors": errors,
                "seeks": seeks[0],
                "requests": requests[0],
            }
        )
    )


# --- the run (this process) ----------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _ingest_all(services: Any, tenant: str, root: Path, count: int) -> list[dict[str, Any]]:
    from fsrecrypt import format as esdk
    from fsrecrypt import pipeline

    def one(i: int) -> dict[str, Any]:
        path = root / "recordings" / f"listener-{i}.wav"
        data = _wav(RECORDING_SECONDS, seed=i)
        path.write_bytes(data)
        rec = pipeline.ingest_file(services, str(path), tenant, user_id="bench").recording
        opened = pipeline.open_recording(services, rec)
        rng = random.Random(1000 + i)
        seeks = []
        for _ in range(SEEKS_PER_RECORDING):
            start = rng.randrange(0, len(data) - 1)
            end = min(start + READ_BYTES, len(data))
            plan = esdk.plan_range(opened.header, opened.object_size, start, end)
            seeks.append((start, plan.ciphertext_start, plan.ciphertext_end))
        return {"id": rec.id, "key": rec.s3_path, "size": len(data), "seeks": seeks}

    (root / "recordings").mkdir(exist_ok=True)
    # Create the custody fingerprint key before the threads do: load_key_file's
    # create-then-write lets a concurrent first reader see an empty file.
    from fsrecrypt.pipeline.custody import FingerprintKey

    FingerprintKey.from_config(services.config)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(count)))


def run() -> dict[str, Any]:
    from bench.bench_stream import (
        _answers,
        bench_tenant,
        config_file,
        cpu_seconds,
        database,
        free_port,
        process,
    )
    from fsrecrypt import pipeline

    workdir = Path(tempfile.mkdtemp(prefix="fsrecrypt-bench-listeners-"))
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update(aws)
    env = {**os.environ}
    moto_port = free_port()
    moto_url = f"http://127.0.0.1:{moto_port}"
    moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)]
    moto_ready = lambda: _answers(moto_url + "/moto-api/data.json")  # noqa: E731
    with database() as dsn, process(moto, env, moto_ready):
        import boto3

        bucket = f"bench-listeners-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(
            Bucket=bucket
        )
        sections: dict[str, dict[str, Any]] = {
            "database": {"dsn": dsn},
            "keys": {"provider": "local", "keyring": str(workdir / "keyring.json")},
            "storage": {"backend": "s3", "bucket": bucket, "endpoint_url": moto_url},
            "playback": {
                "signing_key_file": str(workdir / "sign.key"),
                # every client is 127.0.0.1 here, as behind a proxy
                "max_connections": 2000,
                "max_connections_per_client": 2000,
                "idle_timeout": 120.0,
                "metrics_listen": "",
            },
            "logging": {"level": "warning"},
        }
        config, cfg_path = config_file(sections, workdir / "listeners.toml")
        services = pipeline.Services(config)
        tenant, api_key = bench_tenant(services, "bench-listeners")
        t0 = time.perf_counter()
        recordings = _ingest_all(services, tenant, workdir, CLIENTS)
        ingest_s = time.perf_counter() - t0
        services.close()
        print(
            f"   ingested {len(recordings)} recordings of {RECORDING_SECONDS} s in {ingest_s:.0f} s"
        )

        port = free_port()
        serve = [
            sys.executable,
            "-c",
            "from fsrecrypt.cli import main; main()",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
        ]
        serve_env = {**env, "FSRECRYPT_CONFIG": str(cfg_path)}
        ready = lambda: _answers(f"http://127.0.0.1:{port}/v1/openapi.json")  # noqa: E731
        spec = {
            "port": port,
            "api_key": api_key,
            "moto_url": moto_url,
            "bucket": bucket,
            "clients": CLIENTS,
            "seconds": SECONDS,
            "warmup": WARMUP,
            "recordings": recordings,
        }
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        rss: list[tuple[float, int]] = []
        with process(serve, serve_env, ready) as serve_proc:
            done = threading.Event()

            def sample() -> None:
                t_start = time.monotonic()
                while not done.wait(1.0):
                    rss.append((time.monotonic() - t_start, _rss_kb(serve_proc.pid)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            load_started = time.monotonic()
            cpu_before = cpu_seconds(serve_proc.pid)
            client = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--client", str(spec_path)],
                capture_output=True,
                text=True,
                env=env,
                timeout=WARMUP + SECONDS + 300,
            )
            load_s = time.monotonic() - load_started
            serve_cpu = cpu_seconds(serve_proc.pid) - cpu_before
            done.set()
            sampler.join()
    if client.returncode != 0:
        raise RuntimeError(f"the client process failed:\n{client.stderr[-3000:]}")
    out = json.loads(client.stdout.strip().splitlines()[-1])
    stream, raw = out["stream_ttfb"], out["raw_ttfb"]
    # RSS: the 10 s after warm-up vs the last 10 s
    steady = [kb for t, kb in rss if WARMUP + 2.0 <= t < WARMUP + 12.0]
    last = [kb for t, kb in rss if load_s - 12.0 <= t < load_s - 2.0]
    result = {
        "clients": CLIENTS,
        "seconds": SECONDS,
        "seeks_measured": out["seeks"],
        "errors": len(out["errors"]),
        "error_samples": out["errors"][:5],
        "stream_seek_ttfb_ms": {
            "p50": round(percentile(stream, 50) * 1000, 1),
            "p99": round(percentile(stream, 99) * 1000, 1),
        },
        "raw_ranged_get_ttfb_ms": {
            "p50": round(percentile(raw, 50) * 1000, 1),
            "p99": round(percentile(raw, 99) * 1000, 1),
        },
        "warmup": {
            "seconds": WARMUP,
            "seeks": len(out["warmup_stream_ttfb"]),
            "stream_p99_ms": round(percentile(out["warmup_stream_ttfb"], 99) * 1000, 1),
            "raw_p99_ms": round(percentile(out["warmup_raw_ttfb"], 99) * 1000, 1),
        },
        "p99_ratio": round(percentile(stream, 99) / percentile(raw, 99), 2) if raw else None,
        "p50_ratio": round(percentile(stream, 50) / percentile(raw, 50), 2) if raw else None,
        "serve_rss_mb": {
            "after_warmup": round(statistics.mean(steady) / 1024, 1) if steady else None,
            "last_10s": round(statistics.mean(last) / 1024, 1) if last else None,
            "max": round(max(kb for _t, kb in rss) / 1024, 1) if rss else None,
        },
        # what one seek costs the server, and how much of a core it got
        "serve_cpu_ms_per_request": round(serve_cpu / max(1, out["requests"]) * 1000, 1),
        "serve_cpu_share_of_one_core": round(serve_cpu / load_s, 2),
        "load_average_1m_at_end": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    rss_mb = result["serve_rss_mb"]
    flat = (
        rss_mb["after_warmup"] is not None
        and rss_mb["last_10s"] is not None
        and rss_mb["last_10s"] <= rss_mb["after_warmup"] * 1.10
    )
    result["targets"] = {
        "zero_errors": result["errors"] == 0,
        "p99_seek_ttfb_within_2x_raw": result["p99_ratio"] is not None
        and result["p99_ratio"] <= 2.0,
        "rss_flat": flat,
    }
    print(
        f"[listeners] {CLIENTS} clients x {SECONDS:.0f} s, {out['seeks']} seeks, "
        f"{result['errors']} errors | seek ttfb p50/p99: /stream "
        f"{result['stream_seek_ttfb_ms']['p50']}/{result['stream_seek_ttfb_ms']['p99']} ms vs raw "
        f"ranged GET {result['raw_ranged_get_ttfb_ms']['p50']}/"
        f"{result['raw_ranged_get_ttfb_ms']['p99']} ms = p99 {result['p99_ratio']}x | serve RSS "
        f"{rss_mb['after_warmup']} -> {rss_mb['last_10s']} MB (max {rss_mb['max']}) | serve CPU "
        f"{result['serve_cpu_ms_per_request']} ms/request, "
        f"{result['serve_cpu_share_of_one_core']:.0%} of a core | load "
        f"{result['load_average_1m_at_end']:.1f} on {result['cpus']} CPUs"
    )
    warm = result["warmup"]
    print(
        f"[listeners] warm-up ({WARMUP:.0f} s, reported apart): {warm['seeks']} seeks, p99 "
        f"/stream {warm['stream_p99_ms']} ms vs raw {warm['raw_p99_ms']} ms"
    )
    print("targets:", json.dumps(result["targets"]))
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client_main(json.loads(Path(sys.argv[2]).read_text()))
    else:
        print(json.dumps(run(), indent=2))
