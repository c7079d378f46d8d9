"""The running daemon never stores a WAV that is still being written (issue 7, defect 3).

A RECORD_STOP can arrive for a file whose header still promises more audio than
is on disk (a crafted event, or `uri-failure`-like early events). The daemon
must keep the plaintext, wait, and store it in full once the writer is done.
Daemon as a subprocess; real PostgreSQL, keyring, store and ESL server.
"""

from __future__ import annotations

import struct
import time

import pytest

from tests.support.daemon import DaemonEnv, wav_bytes

pytestmark = pytest.mark.timeout(180)

NO_ADOPTION = {"pipeline": {"quiet_period": 3600.0}}


def test_record_stop_for_a_wav_still_being_written_stores_it_only_in_full(
    daemon_env: DaemonEnv,
) -> None:
    env = daemon_env
    d = env.start(**NO_ADOPTION)
    full = wav_bytes(4.0)  # 64,000 bytes of audio
    assert struct.unpack_from("<I", full, 40)[0] == 64000
    path = env.recordings / "growing.wav"
    path.write_bytes(full[: 44 + 19000])  # the header already says 64 KB
    env.emit_stop(path)
    env.wait(lambda: bool(env.rows(path)), 15, "the pending row")
    time.sleep(2.0)
    assert [r.status for r in env.rows(path)] == ["pending"]
    assert path.read_bytes() == full[: 44 + 19000]
    with path.open("ab") as f:  # the recorder finishes writing and closes the file
        f.write(full[44 + 19000 :])
    row = env.wait_status(path, "stored", timeout=60)
    assert env.decrypt(row) == full
    assert row.file_size_bytes == len(full)
    env.wait(lambda: not path.exists(), 15, "the plaintext to be deleted")
    assert [r.status for r in env.rows(path)] == ["stored"]
    assert d.alive()
