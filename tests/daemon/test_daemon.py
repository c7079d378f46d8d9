"""End-to-end: ``fsrecrypt run`` as a subprocess against PostgreSQL, the ESL replay server
and a local keyring/store. Every fixture flavour of RECORD_STOP, the discard and
uri-failure paths, refusals, the sweep and graceful stop.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.daemon import DaemonEnv

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(
    ("fixture", "channels"),
    [
        ("record_stop.esl", 1),
        ("stereo_record_stop.esl", 2),
        ("uuid_record_record_stop.esl", 1),
    ],
)
def test_record_stop_flavours_are_stored_and_decrypt(
    daemon_env: DaemonEnv, fixture: str, channels: int
) -> None:
    env = daemon_env
    env.start()
    path, data = env.write_wav(seconds=2.5, channels=channels)
    core = str(uuid.uuid4())
    assert (
        env.emit_stop(path, fixture, **{"Core-UUID": core, "variable_recording_consent": "granted"})
        == 1
    )
    row = env.wait_status(path, "stored")
    env.wait(lambda: not path.exists(), 10, "plaintext removal")
    assert env.decrypt(row) == data
    assert row.core_uuid == core
    assert row.encryption_metadata["consent"] == "granted"
    assert row.encryption_metadata["wav"]["channels"] == channels
    assert row.file_size_bytes == len(data)
    lines = [ln for ln in env.log_lines() if ln.get("event") == "recording"]
    assert lines and lines[-1]["outcome"] == "stored"
    assert lines[-1]["recording_id"] == row.id and lines[-1]["bytes"] == len(data)
    assert lines[-1]["tenant"] == env.tenant
    # The fixture's caller id number must not reach the log.
    log_text = (env.tmp / "daemon.log").read_text()
    assert "Caller-Caller-ID-Number" not in log_text


def test_min_sec_discard_is_recorded_once_and_never_retried(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    env.start()
    path = env.recordings / f"{uuid.uuid4()}.wav"  # FreeSWITCH deleted it already
    core = str(uuid.uuid4())
    env.emit_stop(path, "min_sec_record_stop.esl", **{"Core-UUID": core})
    env.emit_stop(path, "min_sec_record_stop.esl", **{"Core-UUID": core})  # replayed
    row = env.wait_status(path, "discarded")
    assert row.source_fingerprint == f"absent:{core}:{path}"
    env.wait(
        lambda: sum(1 for ln in env.log_lines() if ln.get("outcome") == "discarded") >= 2,
        10,
        "both events handled",
    )
    assert len(env.rows(path)) == 1
    assert row.attempts == 0


def test_uri_failure_marks_failed_and_leaves_the_file(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    env.start()
    # A fresh file (inside the quiet period), so no sweep can adopt it before
    # the event's row exists: that race, not the daemon, once failed this test.
    path, data = env.write_wav(seconds=1)
    env.emit_stop(
        path,
        **{
            "Record-Completion-Cause": "uri-failure",
            "variable_record_completion_cause": "uri-failure",
        },
    )
    row = env.wait_status(path, "failed")
    assert "uri-failure" in (row.last_error or "")
    assert row.source_fingerprint.startswith("uri-failure:")
    # Now old enough for any sweep: several sweeps later the file is still
    # there, untouched and not adopted.
    import os
    import time

    old = time.time() - 30
    os.utime(path, (old, old))
    time.sleep(3)
    assert path.read_bytes() == data
    assert [r.status for r in env.rows(path)] == ["failed"]


def test_record_file_path_prefix_block_is_stripped(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    env.start()
    path, data = env.write_wav()
    env.emit_stop(f"{{record_sample_rate=8000,channels=1}}{path}")
    row = env.wait_status(path, "stored")
    assert env.decrypt(row) == data


def test_remote_path_is_out_of_scope(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    env.start()
    env.emit_stop("http://example.invalid/rec.wav")
    env.wait(
        lambda: any(ln.get("event") == "event.out_of_scope" for ln in env.log_lines()),
        10,
        "out-of-scope log line",
    )
    assert env.rows() == []


def test_unknown_tenant_is_a_clear_error_and_the_file_stays(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    env.start()
    # Fresh mtime: a file already past the quiet period could be adopted by the
    # startup sweep before the event arrives (a race, not the case under test). The
    # 1 s quiet period is over long before the sweeps below look at it.
    path, data = env.write_wav()
    env.emit_stop(path, variable_fsrecrypt_tenant="no-such-tenant")
    env.wait(
        lambda: any(ln.get("outcome") == "unknown-tenant" for ln in env.log_lines()),
        10,
        "unknown tenant log line",
    )
    line = next(ln for ln in env.log_lines() if ln.get("outcome") == "unknown-tenant")
    assert "no-such-tenant" in line["error"] and "tenants add" in line["error"]
    import time

    time.sleep(2.5)  # sweeps run: the file must not be adopted under the default tenant
    assert path.read_bytes() == data
    assert env.rows(path) == []
    # A restarted daemon has no memory of the event: the database does, so its
    # sweep still leaves the file alone instead of adopting it for the default tenant.
    assert env.daemons[-1].terminate() == 0
    env.start()
    time.sleep(2.5)
    assert path.read_bytes() == data
    assert env.rows(path) == []
    # Once the tenant exists, the sweep stores the file for that tenant.
    ghost = env.services().db.add_tenant("no-such-tenant", env.key_id)
    row = env.wait_status(path, "stored", timeout=30)
    assert row.tenant_id == ghost.id and row.call_uuid is not None
    assert env.decrypt(row) == data


def test_tenant_from_channel_variable(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    other = f"o{uuid.uuid4().hex[:8]}"
    t = env.services().db.add_tenant(other, env.key_id)
    env.start()
    path, data = env.write_wav()
    env.emit_stop(path, variable_fsrecrypt_tenant=other)
    row = env.wait_status(path, "stored")
    assert row.tenant_id == t.id
    assert env.decrypt(row) == data


def test_sweep_adopts_files_written_while_the_daemon_was_stopped(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    sub = env.recordings / "2026" / "11"
    sub.mkdir(parents=True)
    files = [env.write_wav(directory=sub, mtime_ago=10) for _ in range(5)]
    fresh, _ = env.write_wav()  # still inside its quiet period at start
    partial = env.recordings / "partial.wav"
    partial.write_bytes(files[0][1][:44].replace(files[0][1][4:8], b"\0\0\0\0"))
    os.utime(partial, (0, 0))
    env.start()
    for path, data in files:
        row = env.wait_status(path, "stored")
        assert env.decrypt(row) == data
        assert row.encryption_metadata.get("adopted_by") == "sweep"
    env.wait_status(fresh, "stored")  # adopted once its quiet period is over
    assert partial.exists() and env.rows(partial) == []


def test_sweep_skips_files_held_open_by_another_process(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    path, _data = env.write_wav(mtime_ago=10)
    held = open(path, "rb")
    try:
        env.start()
        import time

        time.sleep(3)
        assert path.exists() and env.rows(path) == []
    finally:
        held.close()
    env.wait_status(path, "stored")


def test_sigterm_is_graceful_and_metrics_and_heartbeat_work(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    d = env.start()
    path, _data = env.write_wav()
    env.emit_stop(path)
    env.wait_status(path, "stored")
    env.wait(lambda: (env.tmp / "run" / "heartbeat").exists(), 10, "heartbeat")
    beat = json.loads((env.tmp / "run" / "heartbeat").read_text())
    assert beat["state"] == "running" and beat["pid"] == d.pid
    with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'fsrecrypt_recordings_total{outcome="stored"} 1.0' in text
    assert "fsrecrypt_esl_connected 1.0" in text
    assert "fsrecrypt_stage_seconds_bucket" in text
    # The CUSTOM status event went out through sendevent.
    sent = env.esl.call("received", prefix="sendevent")
    assert any("fsrecrypt::status" in json.dumps(c) for c in sent)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert json.loads((env.tmp / "run" / "heartbeat").read_text())["state"] == "stopped"
    assert any(ln.get("event") == "daemon.stopped" for ln in env.log_lines())


def test_wav_complete_and_backoff_bounds(tmp_path: Path) -> None:
    from fsrecrypt.daemon import backoff, wav_complete
    from tests.support.daemon import wav_bytes

    full = wav_bytes(0.5)
    p = tmp_path / "a.wav"
    p.write_bytes(full)
    assert wav_complete(str(p))
    p.write_bytes(full[:-100])  # still being written: sizes disagree with the file
    assert not wav_complete(str(p))
    placeholder = full[:4] + b"\0\0\0\0" + full[8:40] + b"\0\0\0\0"
    p.write_bytes(placeholder)  # FreeSWITCH's 44-byte header while recording
    assert not wav_complete(str(p))
    p.write_bytes(b"not a wav at all" * 10)
    assert not wav_complete(str(p))
    for attempt in range(12):
        d = backoff(attempt, 1.0, 60.0)
        ceiling = min(60.0, 2.0**attempt)
        assert max(0.5, ceiling / 2) <= d <= ceiling + 1e-9


def test_daemon_commands_module_import_stays_light() -> None:
    """`--help` imports cli/daemon.py: the daemon package (gevent...) loads only in a command."""
    import subprocess
    import sys

    code = (
        "import sys, fsrecrypt.cli.daemon\n"
        "heavy = [m for m in ('gevent', 'boto3', 'botocore', 'psycopg2', 'structlog',"
        " 'prometheus_client', 'sdnotify') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
