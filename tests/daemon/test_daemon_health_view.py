"""``fsrecrypt health`` reports what the daemon itself observes, not what its caller can do.

Before, health probed FreeSWITCH and the directories with the rights and
password of whoever ran it: a daemon refused by FreeSWITCH (wrong password
in its credential) or unable to list a recordings directory was rated
healthy.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fsrecrypt.daemon import Daemon
from fsrecrypt.daemon.health import DEGRADED, check_daemon_view, run_health
from fsrecrypt.errors import EslError, InvalidState, PathUnreadable
from tests.support.factories import local_config


def test_the_heartbeat_carries_the_daemons_own_view(tmp_path: Path, pg_dsn: str) -> None:
    config = local_config(tmp_path, pg_dsn)
    daemon = Daemon(config)
    hb = daemon.heartbeat
    try:
        daemon.rt.unreadable_dirs = {"/var/lib/freeswitch/recordings"}
        hb.write()
        with pytest.raises(PathUnreadable, match="cannot list /var/lib/freeswitch/recordings"):
            check_daemon_view(config)

        daemon.rt.unreadable_dirs = set()
        hb.esl_down_since = time.time() - 3600  # refused by FreeSWITCH for an hour
        hb.write()
        with pytest.raises(EslError, match="not been connected to FreeSWITCH for 3600s"):
            check_daemon_view(config)
        view = {c.name: c for c in run_health(config)}["daemon"]
        assert view.level == DEGRADED

        hb.esl_down_since = time.time() - 2  # a FreeSWITCH restart: not yet degraded
        hb.write()
        assert check_daemon_view(config).startswith("esl down")
        hb.on_esl_state("connected")  # no EventSource: the state alone clears it
        hb.write(esl_connected=True)
        assert check_daemon_view(config) == "esl connected"
        hb.on_esl_state("disconnected")
        assert hb.esl_down_since is not None
    finally:
        daemon.services.close()


def test_a_hostile_heartbeat_does_not_break_health(tmp_path: Path, pg_dsn: str) -> None:
    config = local_config(tmp_path, pg_dsn)
    Path(config.metrics.heartbeat_file).write_text(
        '{"unreadable_dirs": ["' + "x" * 10000 + '"], "esl_down_since": 1e308}'
    )
    with pytest.raises(PathUnreadable) as info:
        check_daemon_view(config)
    assert len(info.value.message) < 400
    Path(config.metrics.heartbeat_file).write_text('{"esl_down_since": "soon"}')
    assert check_daemon_view(config).startswith("esl state unknown")


def test_plaintext_left_behind_and_failures_since_the_last_store_degrade(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A file the sweep sees past the quiet period + margin, and failures since the
    daemon's last store, are degraded with the reason (health said healthy before)."""
    import os

    config = local_config(tmp_path, pg_dsn, pipeline={"quiet_period": 60.0, "sweep_interval": 5.0})
    daemon = Daemon(config)
    try:
        old = Path(config.freeswitch.recordings_dirs[0]) / "left-behind.wav"
        old.write_bytes(b"RIFF")
        t = time.time() - 3600
        os.utime(old, (t, t))
        daemon.sweeper._sweep_files()
        assert daemon.rt.oldest_plaintext_mtime == pytest.approx(t, abs=1)
        daemon.heartbeat.on_esl_state("connected")
        daemon.heartbeat.write(esl_connected=True)
        with pytest.raises(InvalidState, match=r"plaintext recording has waited 3\d{3}s"):
            check_daemon_view(config)

        daemon.rt.oldest_plaintext_mtime = time.time() - 10  # within the quiet period
        daemon.rt.count("failed")
        daemon.heartbeat.write(esl_connected=True)
        with pytest.raises(InvalidState, match=r"failed 1 recording.*has stored none yet"):
            check_daemon_view(config)
        daemon.rt.count("stored")  # a store clears the count
        daemon.heartbeat.write(esl_connected=True)
        assert check_daemon_view(config) == "esl connected"
    finally:
        daemon.services.close()
