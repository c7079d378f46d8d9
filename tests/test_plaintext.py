"""The plaintext files on disk: what ``open_source`` refuses, and what a WAV header says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fsrecrypt import errors
from fsrecrypt.plaintext import open_source, wav_info
from tests.support.factories import make_wav


def test_path_refusals(tmp_path: Path) -> None:
    allowed = tmp_path / "rec"
    allowed.mkdir()
    outside = tmp_path / "secret.wav"
    outside.write_bytes(b"RIFF")
    link = allowed / "link.wav"
    link.symlink_to(outside)
    fifo = allowed / "pipe.wav"
    os.mkfifo(fifo)
    (allowed / "dir.wav").mkdir()
    linked_dir = tmp_path / "linkdir"
    linked_dir.symlink_to(allowed)
    make_wav(allowed / "ok.wav", 0.01)
    for bad in [
        str(outside),
        str(link),
        str(fifo),
        str(allowed / "dir.wav"),
        str(allowed / ".." / "secret.wav"),
        "relative.wav",
        str(linked_dir / "ok.wav"),
        "/etc/passwd",
        str(allowed) + "/bad\udcff.wav",
    ]:
        with pytest.raises(errors.PathRefused):
            open_source(bad, [str(allowed)])
    ok = open_source(str(allowed / "ok.wav"), [str(allowed)])
    ok.fileobj.close()
    assert outside.read_bytes() == b"RIFF" and fifo.exists()


def test_wav_info_reads_freeswitch_header(tmp_path: Path) -> None:
    blob = make_wav(tmp_path / "s.wav", 3.0, channels=2)
    info = wav_info(blob[:4096], len(blob))
    assert info == {
        "container": "wav",
        "format_tag": 1,
        "channels": 2,
        "sample_rate": 8000,
        "bits": 16,
        "byte_rate": 32000,
        "data_bytes": 96000,
        "duration_s": 3.0,
    }
    assert wav_info(b"not a wav", 9) == {}


def test_the_directory_sync_after_a_deletion_does_not_stop_the_daemon(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Under gevent (the daemon) fsync runs on the thread pool: a slow disk holds up the one
    deletion, not every other recording, the Event Socket reader and the liveness probe."""
    import subprocess
    import sys

    code = """
from gevent import monkey
monkey.patch_all()
import os, sys, time
import gevent
from fsrecrypt import plaintext
real_sleep = monkey.get_original("time", "sleep")
os.fsync = lambda fd: real_sleep(0.3)  # a disk that takes 300 ms to flush
ticks = []
def ticker():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)
gevent.spawn(ticker)
gevent.sleep(0.05)
before = len(ticks)
fd = os.open(sys.argv[1], os.O_RDONLY)
plaintext._fsync_cooperatively(fd)
print(len(ticks) - before)
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert int(out.stdout.strip()) >= 10, "the other greenlets stood still during the fsync"
