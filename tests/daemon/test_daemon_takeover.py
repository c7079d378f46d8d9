"""Two daemons share a database and a recordings directory; one is SIGKILLed holding claims.

Claims are short leases renewed by each daemon's heartbeat (``[jobs]
lease_seconds``): the survivor must store the dead daemon's recordings within
60 s (a fixed 600 s lease left them as plaintext for ten minutes), and every
recording must be stored exactly once.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from tests.support.daemon import DaemonEnv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N_RECORDINGS = 80


def _claims_of(dsn: str, pid: int) -> list[str]:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT id::text FROM call_recordings WHERE status = 'pending'"
                " AND claimed_by LIKE %s",
                (f"{socket.gethostname()}:{pid}:%",),
            )
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def test_a_killed_daemons_claims_are_taken_over_within_60s(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    overrides = {"pipeline": {"quiet_period": 0.5, "sweep_interval": 5.0, "concurrency": 2}}
    first = env.start(wait_ready=False, **overrides)
    assert env.esl.call("wait_subscribed", n=1, timeout=30.0), env.log_tail()
    second = env.start(wait_ready=False, **overrides)
    assert env.esl.call("wait_subscribed", n=2, timeout=30.0), env.log_tail()
    originals: dict[Path, bytes] = {}
    done_writing = threading.Event()

    def generate() -> None:
        for i in range(N_RECORDINGS):
            path, data = env.write_wav(name=f"take-{i:03d}.wav", seconds=6.0)
            originals[path] = data
            env.emit_stop(path)
            time.sleep(0.01)
        done_writing.set()

    gen = threading.Thread(target=generate, daemon=True)
    gen.start()
    held: list[str] = []
    deadline = time.monotonic() + 60
    while not held:
        assert time.monotonic() < deadline, "the first daemon never held a claim\n" + env.log_tail()
        held = _claims_of(env.dsn, first.pid)
    first.kill9()
    killed_at = time.monotonic()
    held = _claims_of(env.dsn, first.pid)  # what it held when it died
    assert held
    gen.join(120)
    assert done_writing.is_set()

    db = env.services().db
    env.wait(
        lambda: all(db.recording(rid).status == "stored" for rid in held),
        75,
        "the dead daemon's claimed recordings to be stored by the other",
    )
    assert time.monotonic() - killed_at < 60 + 5  # polling and process slack

    def all_done() -> bool:
        stored = {r.source_path for r in env.rows() if r.status == "stored"}
        return all(str(p) in stored and not p.exists() for p in originals)

    env.wait(all_done, 120, "every recording stored and its plaintext removed")
    assert second.alive()
    rows = env.rows()
    # Exactly once: one row per file, all stored, each decrypting to the original.
    assert sorted(r.source_path for r in rows) == sorted(str(p) for p in originals)
    by_path = {r.source_path: r for r in rows}
    for path in [*list(originals)[:10], Path(db.recording(held[0]).source_path)]:
        assert env.decrypt(by_path[str(path)]) == originals[path]
