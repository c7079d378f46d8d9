"""Crafted RECORD_STOPs against ``fsrecrypt run`` as a real subprocess.

Each event below used to kill the daemon's ESL dispatcher for good (the
failure handler itself raised TypeError): health stayed green while every
later recording stayed on disk as plaintext. Now each is refused or
sanitised, counted, logged once, and the next ordinary recording is stored.
The sweep is kept out of the way (long quiet period), so only event handling
can store the follow-up recording.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.daemon import DaemonEnv

pytestmark = pytest.mark.timeout(180)

NO_SWEEP = {"pipeline": {"quiet_period": 3600.0}}


def refused(env: DaemonEnv, reason: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf'fsrecrypt_refused_events_total\{{reason="{reason}"\}} ([0-9.]+)', text)
    return float(m.group(1)) if m else 0.0


def _refusal_lines(env: DaemonEnv) -> list[dict]:
    return [ln for ln in env.log_lines() if ln.get("event") == "event.refused"]


def _store_a_normal_recording(env: DaemonEnv) -> None:
    path, data = env.write_wav()
    env.emit_stop(path)
    assert env.decrypt(env.wait_status(path, "stored")) == data


@pytest.mark.parametrize("kind", ["symlink-loop", "nul-in-path"])
def test_unresolvable_or_unstorable_paths_are_refused_and_the_daemon_goes_on(
    daemon_env: DaemonEnv, kind: str
) -> None:
    env = daemon_env
    d = env.start(**NO_SWEEP)
    if kind == "symlink-loop":
        loop = env.recordings / "loop.wav"
        loop.symlink_to(loop)
        event_path = str(loop)
    else:
        real, _ = env.write_wav(name="real.wav")
        event_path = f"{real}\x00.txt"  # arrives as %00 on the wire
    env.emit_stop(event_path)
    env.wait(lambda: refused(env, "path") >= 1, 15, "the refusal to be counted")
    lines = _refusal_lines(env)
    assert len(lines) == 1 and lines[0]["reason"] == "path", lines
    assert "refusing" in lines[0]["error"]
    if kind == "nul-in-path":
        assert "NUL" in lines[0]["error"]
    _store_a_normal_recording(env)
    _store_a_normal_recording(env)
    assert d.alive()
    assert not any(ln.get("event") == "esl.on_event_failed" for ln in env.log_lines())
    assert len(env.rows()) == 2  # nothing was registered for the refused event
    if kind == "symlink-loop":
        assert (env.recordings / "loop.wav").is_symlink()


def test_a_non_utf8_file_name_does_not_stop_the_sweep(daemon_env: DaemonEnv) -> None:
    """A name PostgreSQL cannot take is refused once; other orphans are still adopted.

    Before, every sweep pass crashed on it (psycopg2 cannot encode the name),
    so no orphan was ever adopted again while the daemon looked healthy.
    """
    env = daemon_env
    latin1 = os.path.join(os.fsencode(env.recordings), b"caf\xe9.wav")
    hostile, _ = env.write_wav(name="x.wav", mtime_ago=60)
    os.rename(hostile, latin1)
    orphan, data = env.write_wav(mtime_ago=60)
    d = env.start()
    assert env.decrypt(env.wait_status(orphan, "stored", timeout=30)) == data
    env.wait(lambda: refused(env, "path") == 1, 10, "the refusal to be counted")
    lines = _refusal_lines(env)
    assert len(lines) == 1 and "UTF-8" in lines[0]["error"] and lines[0]["origin"] == "sweep"
    assert os.path.exists(latin1)  # left untouched
    time.sleep(3.0)  # three more sweep passes (sweep_interval 1 s)
    assert refused(env, "path") == 1  # refused once, not on every pass
    assert not any(ln.get("event") == "daemon.loop_pass_crashed" for ln in env.log_lines())
    assert d.alive()


@pytest.mark.parametrize(
    ("header", "field"),
    [("variable_recording_consent", "consent"), ("Channel-Call-UUID", "call_uuid")],
)
@pytest.mark.parametrize("hostile", ["yes\udcff", "y\x00es"], ids=["non-utf8", "nul"])
def test_hostile_header_values_are_sanitised_and_the_recording_stored(
    daemon_env: DaemonEnv, header: str, field: str, hostile: str
) -> None:
    env = daemon_env
    d = env.start(**NO_SWEEP)
    path, data = env.write_wav()
    env.emit_stop(path, **{header: hostile})
    row = env.wait_status(path, "stored")
    assert env.decrypt(row) == data
    meta = row.encryption_metadata
    value = meta["consent"] if field == "consent" else row.call_uuid
    assert value == hostile.replace("\udcff", "\ufffd").replace("\x00", "\ufffd")
    assert meta["sanitised_fields"] == [field]
    assert not Path(path).exists()  # stored, so the plaintext is gone
    _store_a_normal_recording(env)
    assert d.alive()
    assert refused(env, "internal-error") == 0
