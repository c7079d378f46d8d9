"""A heartbeat file that cannot be written is warned about once, not every 5 seconds.

Before, run outside systemd (no /run/fsrecrypt), the daemon logged
``daemon.heartbeat_failed`` at every housekeeping pass, burying the rest.
"""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from fsrecrypt.daemon import Daemon
from tests.support.factories import local_config


def test_an_unwritable_heartbeat_is_warned_about_once(tmp_path: Path, pg_dsn: str) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("a file where the directory should be")
    heartbeat = blocker / "heartbeat"
    daemon = Daemon(local_config(tmp_path, pg_dsn, metrics={"heartbeat_file": str(heartbeat)}))
    try:
        with capture_logs() as logs:
            for _ in range(5):
                daemon.heartbeat.write()
            blocker.unlink()
            daemon.heartbeat.write()
            daemon.heartbeat.write()
        events = [ln["event"] for ln in logs]
        assert events.count("daemon.heartbeat_failed") == 1
        failed = next(ln for ln in logs if ln["event"] == "daemon.heartbeat_failed")
        assert failed["log_level"] == "warning" and "heartbeat_file" in failed["hint"]
        assert events.count("daemon.heartbeat_written") == 1
        assert heartbeat.exists()
    finally:
        daemon.services.close()
