"""Outages around the daemon (a subprocess): S3/KMS unreachable for 30 s, PostgreSQL
restarted, FreeSWITCH's Event Socket dropped mid-frame and restarted, and a burst
of 1000 events with bounded memory. Nothing may be lost; the daemon stays up.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonEnv
from tests.support.tcpproxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def metric(env: DaemonEnv, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_s3_and_kms_unreachable_for_30s_retries_and_loses_nothing(
    daemon_env_s3: DaemonEnv,
) -> None:
    env = daemon_env_s3
    moto_port = int(env.storage["endpoint_url"].rsplit(":", 1)[1])
    proxy = TcpProxy(moto_port)
    proxy.up()
    via = f"http://127.0.0.1:{proxy.port}"
    overrides: dict[str, Any] = {
        "storage": {"endpoint_url": via},
        "keys": {"endpoint_url": via},
        "pipeline": {"max_attempts": 30, "retry_base": 0.5, "retry_cap": 4.0},
    }
    d = env.start(**overrides)
    first, first_data = env.write_wav()
    env.emit_stop(first)
    assert env.decrypt(env.wait_status(first, "stored")) == first_data

    proxy.down()
    during: list[tuple[Path, bytes]] = []
    t0 = time.monotonic()
    for _ in range(6):
        path, data = env.write_wav(seconds=2)
        env.emit_stop(path)
        during.append((path, data))
        time.sleep(1)
    time.sleep(max(0.0, 30 - (time.monotonic() - t0)))
    for path, _ in during:
        assert path.exists(), "plaintext must stay while the store is unreachable"
        assert all(r.status == "pending" for r in env.rows(path))
    assert metric(env, "fsrecrypt_retries_total") >= 6
    assert d.alive()
    proxy.up()
    for path, data in during:
        row = env.wait_status(path, "stored", timeout=60)
        assert env.decrypt(row) == data
        assert row.attempts >= 1
        env.wait(lambda p=path: not p.exists(), 10, "plaintext removal")
    assert d.alive()
    proxy.down()


def test_postgresql_restart_daemon_stays_up_and_nothing_is_lost(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    d = env.start(pipeline={"max_attempts": 40, "retry_base": 0.3, "retry_cap": 2.0})
    before, _before_data = env.write_wav()
    env.emit_stop(before)
    env.wait_status(before, "stored")
    env.services().close()  # our own pooled connections die with the server too
    files = [env.write_wav() for _ in range(5)]
    ver = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    # Down for ~2 s while events arrive (other sessions share the server: keep it short).
    ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", ver, "main"]
    subprocess.run([*ctl, "stop", "-m", "fast"], check=True)
    try:
        for path, _ in files:
            env.emit_stop(path)
        time.sleep(2)
    finally:
        # Another session may have started it already (its fixture never skips).
        subprocess.run([*ctl, "start"], check=False)
        subprocess.run(
            ["bash", ".ci/ensure-postgres"], check=True, cwd=Path(__file__).resolve().parents[2]
        )
    for path, data in files:
        row = env.wait_status(path, "stored", timeout=60)
        assert env.decrypt(row) == data
    after, after_data = env.write_wav()
    env.emit_stop(after)
    assert env.decrypt(env.wait_status(after, "stored")) == after_data
    assert d.alive()
    retried = [ln for ln in env.log_lines() if ln.get("event") == "job.retry"]
    assert retried and "database" in retried[0]["error"].lower()


def test_esl_dropped_mid_frame_and_restarted_daemon_reconnects(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    d = env.start(pipeline={"quiet_period": 3600.0})
    assert env.esl.call("drop_mid_frame") == 1
    env.esl.call("stop")
    time.sleep(2)
    path_down, data_down = env.write_wav()  # this event is lost while FreeSWITCH is away
    env.esl.call("start")
    assert env.esl.call("wait_subscribed", n=1, timeout=30.0, min_connections=2), env.log_tail()
    path, data = env.write_wav()
    env.emit_stop(path)
    assert env.decrypt(env.wait_status(path, "stored")) == data
    states = [ln.get("state") for ln in env.log_lines() if ln.get("event") == "esl.state"]
    assert "disconnected" in states or "backoff" in states
    assert states.count("connected") >= 2
    assert metric(env, "fsrecrypt_esl_reconnects") >= 1
    assert metric(env, "fsrecrypt_esl_connected") == 1
    assert len(env.rows()) == 1  # the half frame created nothing
    assert path_down.read_bytes() == data_down
    # Liveness: a hung FreeSWITCH (socket open, no answers) is detected and left.
    env.esl.call("hang")
    env.wait(
        lambda: any(ln.get("event") == "esl.liveness_miss" for ln in env.log_lines()),
        20,
        "a liveness miss",
    )
    env.esl.call("unhang")
    assert env.esl.call("wait_subscribed", n=1, timeout=30.0, min_connections=3)
    assert d.alive()


def test_burst_of_1000_events_all_stored_with_bounded_rss(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    d = env.start(pipeline={"concurrency": 8, "quiet_period": 3600.0})
    originals = [env.write_wav(name=f"burst-{i:04d}.wav", seconds=2) for i in range(1000)]
    rss_max = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal rss_max
        while not stop.is_set():
            rss_max = max(rss_max, d.rss_kib())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    for path, _ in originals:
        env.emit_stop(path)
    env.wait(lambda: env.services().db.status_counts().get("stored", 0) >= 1000, 240, "1000 stored")
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join()
    rng = list(range(0, 1000, 37))
    for i in rng:
        path, data = originals[i]
        assert not path.exists()
        assert env.decrypt(env.rows(path)[0]) == data
    assert len(env.rows()) == 1000
    print(f"burst: 1000 recordings in {elapsed:.1f}s, daemon RSS max {rss_max / 1024:.0f} MiB")
    assert rss_max < 200 * 1024, f"RSS {rss_max} KiB"
