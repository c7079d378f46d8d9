"""Operations: the systemd unit's hardening rating, sd_notify, ``fsrecrypt health``,
SIGHUP reload and the give-up path after ``max_attempts``. Daemon as a subprocess.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.daemon import DaemonEnv
from tests.support.moto import free_port

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "fsrecrypt.service"

pytestmark = pytest.mark.timeout(180)


def test_systemd_unit_is_rated_ok_or_better_by_systemd_analyze() -> None:
    subprocess.run(["bash", str(ROOT / ".ci" / "ensure-systemd-analyze")], check=True)
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for fsrecrypt\.service: ([0-9.]+) (\w+)", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr
    assert m.group(2) in ("PERFECT", "SAFE", "OK"), m.group(0)
    assert float(m.group(1)) < 5.0
    unit = UNIT.read_text()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "LoadCredential=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "ReadWritePaths=",
        "RestrictAddressFamilies=",
        "SystemCallFilter=",
        "Group=freeswitch",
    ):
        assert directive in unit, directive
    assert re.search(r"^CapabilityBoundingSet=$", unit, re.M)


def _run_cli(env: DaemonEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from fsrecrypt.cli import main; main()",
            "-c",
            str(env.tmp / "fsrecrypt.toml"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_health_healthy_degraded_down(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    d = env.start()
    env.wait(lambda: (env.tmp / "run" / "heartbeat").exists(), 15, "heartbeat")
    res = _run_cli(env, "health", "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert doc["status"] == "healthy"
    assert set(doc["checks"]) == {
        "freeswitch",
        "database",
        "keys",
        "store",
        "backlog",
        "masks",
        "heartbeat",
        "daemon",
        "daemon-access",
    }
    assert "tenant key(s) usable" in doc["checks"]["daemon-access"]["detail"]
    env.esl.call("stop")  # FreeSWITCH away: degraded, the daemon keeps trying
    res = _run_cli(env, "health", "--json")
    assert res.returncode == 1, res.stdout
    assert json.loads(res.stdout)["checks"]["freeswitch"]["status"] == "degraded"
    env.esl.call("start")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    res = _run_cli(env, "health")
    assert res.returncode == 2, res.stdout
    assert "heartbeat" in res.stdout and "overall: down" in res.stdout


def test_sd_notify_ready_watchdog_status_stopping(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    sock_path = env.tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    got: list[str] = []
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    env.extra_env.update(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000")
    d = env.start()
    env.wait(lambda: any("WATCHDOG=1" in m for m in got), 10, "a watchdog ping")
    assert any("READY=1" in m for m in got)
    env.wait(lambda: any(m.startswith("STATUS=running;") for m in got), 15, "a status line")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    done.set()
    t.join(2)
    sock.close()
    assert any("STOPPING=1" in m for m in got)


def test_sighup_reloads_logging_and_retry_settings(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    d = env.start()
    env.write_config(logging={"level": "debug"}, pipeline={"max_attempts": 3})
    d.proc.send_signal(signal.SIGHUP)
    env.wait(
        lambda: any(ln.get("event") == "daemon.reloaded" for ln in env.log_lines()), 10, "reload"
    )
    path, data = env.write_wav()
    env.emit_stop(path)
    assert env.decrypt(env.wait_status(path, "stored")) == data
    assert d.alive()


def test_gives_up_after_max_attempts_and_keeps_the_plaintext(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: every upload fails
    env.start(
        storage={"backend": "s3", "bucket": "unreachable", "endpoint_url": closed},
        pipeline={"max_attempts": 2, "retry_base": 0.1, "retry_cap": 0.2},
    )
    path, data = env.write_wav(mtime_ago=5)
    env.emit_stop(path)
    row = env.wait_status(path, "failed", timeout=90)
    assert row.attempts == 2
    assert "S3" in (row.last_error or "") or "store" in (row.last_error or "").lower()
    time.sleep(2.5)  # sweeps do not resurrect it
    assert path.read_bytes() == data
    assert [r.status for r in env.rows(path)] == ["failed"]
    failed = [
        ln
        for ln in env.log_lines()
        if ln.get("event") == "recording" and ln.get("outcome") == "failed"
    ]
    assert len(failed) == 1 and failed[0]["attempts"] == 2


def test_waits_for_an_unreachable_database_and_stops_cleanly(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    d = env.start(wait_ready=False, database={"dsn": dead, "connect_timeout": 1.0})
    env.wait(
        lambda: any(ln.get("event") == "daemon.database_unavailable" for ln in env.log_lines()),
        20,
        "the daemon to report the database",
    )
    assert d.alive()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0
