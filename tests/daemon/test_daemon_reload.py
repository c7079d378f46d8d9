"""SIGHUP applies a new ``sweep_interval`` at once, not after the old interval ran out.

Before, the sweeper slept the whole old interval (e.g. 300 s) before it
read the new one, so lowering it by SIGHUP seemed to do nothing.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.daemon import DaemonEnv

pytestmark = pytest.mark.timeout(120)


def test_sighup_applies_a_shorter_sweep_interval_at_once(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    d = env.start(pipeline={"sweep_interval": 600.0, "quiet_period": 0.5})
    env.wait(
        lambda: any(ln.get("event") == "daemon.started" for ln in env.log_lines()), 15, "start"
    )
    time.sleep(1.0)  # the first sweep has run; the next is 600 s away
    path, data = env.write_wav(mtime_ago=5)  # no event: only a sweep finds it
    time.sleep(2.0)
    assert env.rows(path) == []
    env.write_config(pipeline={"sweep_interval": 1.0, "quiet_period": 0.5})
    d.proc.send_signal(signal.SIGHUP)
    row = env.wait_status(path, "stored", timeout=20)
    assert env.decrypt(row) == data
    assert d.alive()
