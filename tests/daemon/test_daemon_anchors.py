"""The daemon anchors the audit chains on its own, and the custody of what it stored is kept."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.lifecycle.anchors import parse_anchor, verify_against_anchors
from tests.support.daemon import DaemonEnv

pytestmark = pytest.mark.timeout(180)


def test_daemon_writes_due_anchors_and_records_custody(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    anchors = env.tmp / "anchors"
    audit = {
        "anchor_dir": str(anchors),
        "anchor_key_file": str(env.tmp / "secrets" / "anchor.key"),
        "anchor_interval": 60.0,
    }
    env.start(audit=audit)
    path, data = env.write_wav(seconds=1.5)
    assert env.emit_stop(path, **{"Core-UUID": str(uuid.uuid4())}) == 1
    row = env.wait_status(path, "stored")
    env.wait(lambda: not path.exists(), 10, "plaintext removal")
    # The first housekeeping pass anchors at once; the next is due only after the interval.
    env.wait(lambda: (anchors / "000000000001.json").exists(), 30, "the first anchor")
    doc = parse_anchor((anchors / "000000000001.json").read_bytes())
    assert doc["seq"] == 1
    assert any(ln.get("event") == "daemon.anchor_written" for ln in env.log_lines())
    assert sorted(p.name for p in anchors.iterdir()) == ["000000000001.json"]
    services = env.services()
    config = env.config(audit=audit)
    from fsrecrypt.pipeline import Services

    checker = Services(config)
    try:
        assert verify_against_anchors(checker).ok
    finally:
        checker.close()
    cfg = env.write_config(audit=audit)
    run = CliRunner().invoke(main, ["-c", str(cfg), "custody", row.id])
    assert run.exit_code == 0, run.output
    custody = json.loads(run.stdout)
    assert custody["created"]["by"] == "RECORD_STOP"
    assert custody["plaintext_deleted"]["host"] == socket.gethostname()
    assert len(custody["fingerprint"]["value"]) == 64
    assert services.db.recording(row.id).file_size_bytes == len(data)
