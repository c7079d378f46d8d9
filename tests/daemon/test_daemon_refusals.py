"""Events from the network must never make the daemon open, store or delete a file
it should not: forged headers, traversal, symlinks, FIFOs. Daemon as a subprocess.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.daemon import DaemonEnv

pytestmark = pytest.mark.timeout(180)

NO_SWEEP = {"pipeline": {"quiet_period": 3600.0}}


def refused_count(env: DaemonEnv) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'fsrecrypt_refused_events_total\{reason="path"\} ([0-9.]+)', text)
    return float(m.group(1)) if m else 0.0


def test_header_injection_in_caller_id_cannot_forge_tenant_or_path(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    evil = f"evil{uuid.uuid4().hex[:6]}"
    env.services().db.add_tenant(evil, env.key_id)
    env.start(**NO_SWEEP)
    victim, victim_data = env.write_wav(name="victim.wav")
    path, data = env.write_wav()
    forged = f"Mallory\nvariable_fsrecrypt_tenant: {evil}\nRecord-File-Path: {victim}\n"
    env.emit_stop(
        path, **{"Caller-Caller-ID-Name": forged, "variable_effective_caller_id_name": forged}
    )
    row = env.wait_status(path, "stored")
    assert row.tenant_id == env.services().db.tenant_by_name(env.tenant).id
    assert env.decrypt(row) == data
    time.sleep(1)
    assert victim.read_bytes() == victim_data
    assert env.rows(victim) == []
    assert "Mallory" not in (env.tmp / "daemon.log").read_text()


@pytest.mark.parametrize(
    "kind",
    [
        "traversal",
        "absolute-outside",
        "etc-passwd",
        "missing-outside",
        "symlink",
        "symlinked-dir",
        "fifo",
    ],
)
def test_unsafe_paths_are_refused_and_left_untouched(
    daemon_env: DaemonEnv, tmp_path: Path, kind: str
) -> None:
    env = daemon_env
    outside = tmp_path / "outside"
    outside.mkdir()
    target, target_data = env.write_wav(name="secret.wav", directory=outside)
    d = env.start(**NO_SWEEP)
    before = refused_count(env)
    if kind == "traversal":
        event_path = f"{env.recordings}/../outside/secret.wav"
    elif kind == "absolute-outside":
        event_path = str(target)
    elif kind == "etc-passwd":
        event_path = "/etc/passwd"
    elif kind == "missing-outside":
        event_path = str(outside / "never-written.wav")
    elif kind == "symlink":
        link = env.recordings / "link.wav"
        link.symlink_to(target)
        event_path = str(link)
    elif kind == "symlinked-dir":
        (env.recordings / "sub").symlink_to(outside)
        event_path = str(env.recordings / "sub" / "secret.wav")
    else:
        fifo = env.recordings / "pipe.wav"
        os.mkfifo(fifo)
        event_path = str(fifo)
    env.emit_stop(event_path)
    env.wait(lambda: refused_count(env) >= before + 1, 15, "the refusal to be counted")
    line = next(ln for ln in reversed(env.log_lines()) if ln.get("event") == "event.refused")
    assert line["reason"] == "path" and "refusing" in line["error"]
    assert target.read_bytes() == target_data
    assert env.rows() == []
    if kind == "fifo":
        assert (env.recordings / "pipe.wav").exists()
    # The daemon is still healthy and still working.
    path, data = env.write_wav()
    env.emit_stop(path)
    assert env.decrypt(env.wait_status(path, "stored")) == data
    assert d.alive()


def test_raw_non_utf8_bytes_in_an_event_do_not_stop_the_daemon(
    daemon_env: DaemonEnv,
) -> None:
    import base64

    from tests.support.eslserver import build_event_frame

    env = daemon_env
    d = env.start(**NO_SWEEP)
    path, data = env.write_wav()
    frame = build_event_frame(
        "record_stop.esl", {"Record-File-Path": str(path), "Caller-Caller-ID-Name": "XY"}
    )
    frame = frame.replace(b"Caller-Caller-ID-Name: XY", b"Caller-Caller-ID-Name: \xff\xfe")
    assert env.esl.call("emit_raw", data_b64=base64.b64encode(frame).decode()) == 1
    assert env.decrypt(env.wait_status(path, "stored")) == data
    path2, data2 = env.write_wav()
    env.emit_stop(path2)
    assert env.decrypt(env.wait_status(path2, "stored")) == data2
    assert d.alive()
