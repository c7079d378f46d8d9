"""No silent half-alive daemon: a supervised greenlet that dies ends the process loudly.

The fault is real, not a hook: a column the sweep's query needs is renamed in
the daemon's own PostgreSQL database, so every sweep pass fails with a
psycopg2 ProgrammingError that fsrecrypt does not map. Each failing pass is
contained and logged; after LOOP_CRASH_LIMIT in a row the sweeper gives up,
and the supervisor must then stop feeding systemd's watchdog, record the dead
greenlet in the heartbeat (``fsrecrypt health`` names it) and exit non-zero.
Before, the sweep logged the error forever while health stayed green.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psycopg2
import pytest

from fsrecrypt.daemon import EXIT_GREENLET_DIED, LOOP_CRASH_LIMIT
from tests.support.daemon import DaemonEnv

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def _health(env: DaemonEnv) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from fsrecrypt.cli import main; main()",
            "-c",
            str(env.tmp / "fsrecrypt.toml"),
            "health",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


class NotifySocket:
    """A stand-in for systemd's NOTIFY_SOCKET that records every datagram in order."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                self.got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        self.sock.close()


def test_a_dead_sweeper_makes_the_daemon_unhealthy_unfed_and_exit(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    notify = NotifySocket(env.tmp / "notify.sock")
    try:
        env.extra_env.update(NOTIFY_SOCKET=str(notify.sock.getsockname()), WATCHDOG_USEC="400000")
        d = env.start()
        env.wait(lambda: any("WATCHDOG=1" in m for m in notify.got), 10, "a watchdog ping")
        assert json.loads(_health(env).stdout)["checks"]["heartbeat"]["status"] == "healthy"

        with psycopg2.connect(env.dsn) as conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE call_recordings RENAME COLUMN next_attempt_at TO broken")
        conn.close()

        try:
            code = d.proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "the daemon kept running with a dead sweeper\n" + env.log_tail()
            ) from None
        assert code == EXIT_GREENLET_DIED, env.log_tail()
    finally:
        notify.close()

    lines = env.log_lines()
    crashed = [ln for ln in lines if ln.get("event") == "daemon.loop_pass_crashed"]
    assert len(crashed) == LOOP_CRASH_LIMIT  # each failing pass contained and logged first
    assert all(ln["greenlet"] == "sweeper" and "UndefinedColumn" in ln["error"] for ln in crashed)
    died = [ln for ln in lines if ln.get("event") == "daemon.greenlet_died"]
    assert [ln["greenlet"] for ln in died] == ["sweeper"], env.log_tail()
    assert "LoopBroken" in died[0]["error"]

    # systemd's watchdog is no longer fed once the failure is known.
    failed_at = next(i for i, m in enumerate(notify.got) if m.startswith("STATUS=failed"))
    assert "sweeper" in notify.got[failed_at]
    assert not any("WATCHDOG=1" in m for m in notify.got[failed_at:])

    beat = json.loads((env.tmp / "run" / "heartbeat").read_text())
    assert beat["state"] == "failed"
    assert [f["greenlet"] for f in beat["failures"]] == ["sweeper"]

    res = _health(env)
    doc = json.loads(res.stdout)
    assert res.returncode == 2, res.stdout + res.stderr
    assert doc["status"] == "down"
    assert doc["checks"]["heartbeat"]["status"] == "down"
    assert "sweeper" in doc["checks"]["heartbeat"]["detail"]
