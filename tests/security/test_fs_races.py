"""A local attacker who can write the recordings directory must not make fsrecrypt read,
store or delete anything outside it, and a file still being written must never be
stored short and then deleted (issue 7, defects 2 and 3).

The race is real: a separate process swaps a directory inside the recordings
directory with a symbolic link to an outside directory (renameat2 with
RENAME_EXCHANGE, via ctypes) as fast as it can, while the pipeline opens,
reads and deletes through the swapped name thousands of times.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsrecrypt import errors
from fsrecrypt.pipeline import (
    Services,
    fetch_recording,
    register_source,
    store_recording,
    worker_id,
)
from fsrecrypt.plaintext import (
    delete_plaintext,
    open_source,
    remove_source_if_unchanged,
    vet_path,
    wav_state,
)
from tests.support.factories import local_config, make_wav, unique

RACER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
a, b, seconds = sys.argv[1].encode(), sys.argv[2].encode(), float(sys.argv[3])
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(200):
        if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
            raise SystemExit(f"renameat2 failed: {os.strerror(ctypes.get_errno())}")
"""


def start_racer(a: Path, b: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", RACER, str(a), str(b), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_exchange_race_never_reads_or_unlinks_outside(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    sub = recordings / "sub"
    sub.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"SECRET-KEYRING " * 64
    (outside / "rec.wav").write_bytes(secret)
    link = recordings / "link"
    link.symlink_to(outside)
    # A descriptor on the real inside directory: its inode stays the same
    # whichever name it has at the moment, so it can be refilled mid-race.
    inside_fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
    inside = b"inside recording " * 64

    def refill() -> None:
        fd = os.open("rec.wav", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=inside_fd)
        os.write(fd, inside)
        os.close(fd)

    refill()
    racer = start_racer(sub, link, 30.0)
    opened = deleted = refused = 0
    try:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            try:
                source = open_source(str(sub / "rec.wav"), [str(recordings)])
            except (errors.PathRefused, errors.InputFileError):
                refused += 1
                continue
            try:
                data = source.fileobj.read()
                assert data != secret, "read a file outside the recordings directory"
                assert data == inside
                opened += 1
                if delete_plaintext(source):
                    deleted += 1
                    refill()
            finally:
                source.fileobj.close()
            # erase's path: same walk, same checks
            remove_source_if_unchanged(str(sub / "rec.wav"), "0:0:0:0", [str(recordings)])
    finally:
        racer.kill()
        racer.wait()
        os.close(inside_fd)
    assert (outside / "rec.wav").read_bytes() == secret, "a file outside was unlinked"
    assert sorted(p.name for p in outside.iterdir()) == ["rec.wav"]
    # The race really ran both ways: some walks met the symlink, some the directory.
    assert refused > 0 and opened > 0 and deleted > 0, (opened, deleted, refused)


def test_hard_link_to_an_outside_file_is_refused(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    outside = tmp_path / "keyring.json"
    outside.write_bytes(b'{"keys": "secret"}')
    os.link(outside, recordings / "call.wav")
    with pytest.raises(errors.PathRefused, match="links"):
        open_source(str(recordings / "call.wav"), [str(recordings)])
    st = os.stat(outside)
    fingerprint = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    assert not remove_source_if_unchanged(
        str(recordings / "call.wav"), fingerprint, [str(recordings)]
    )
    assert outside.read_bytes() == b'{"keys": "secret"}'
    assert (recordings / "call.wav").exists()


def test_symlinked_or_odd_intermediate_components_are_refused(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    (recordings / "day").mkdir(parents=True)
    make_wav(recordings / "day" / "ok.wav", 0.01)
    outside = tmp_path / "outside"
    outside.mkdir()
    make_wav(outside / "ok.wav", 0.01, seed=9)
    (recordings / "out").symlink_to(outside)
    (recordings / "back").symlink_to(recordings / "day")  # even one pointing inside
    (recordings / "loop").symlink_to(recordings / "loop")  # resolves to nothing
    root = str(recordings)
    bad = [
        f"{root}/out/ok.wav",
        f"{root}/back/ok.wav",
        f"{root}/loop/ok.wav",
        f"{root}/day/./ok.wav",
        f"{root}//day/ok.wav",
        f"{root}/day/ok.wav/",
        f"{root}/day\0/ok.wav",
        f"{root}/day/../day/ok.wav",
    ]
    for path in bad:
        with pytest.raises(errors.PathRefused):
            open_source(path, [root])
        with pytest.raises(errors.PathRefused):
            vet_path(path, [root])
    ok = open_source(f"{root}/day/ok.wav", [root])
    ok.fileobj.close()


def partial_wav(path: Path, total_data: int, present: int) -> tuple[bytes, bytes]:
    """A WAV header claiming ``total_data`` bytes with only ``present`` written (and the rest)."""
    full = make_wav(path, total_data / 16000)
    assert struct.unpack_from("<I", full, 40)[0] == total_data
    path.write_bytes(full[: 44 + present])
    return full, full[44 + present :]


@pytest.fixture
def services(tmp_path: Path, pg_dsn: str):
    svc = Services(local_config(tmp_path, pg_dsn))
    key = unique("k")
    svc.keys.create_key(key)
    tenant = svc.db.add_tenant(unique("t"), key)
    yield svc, tenant, tmp_path / "recordings"
    svc.close()


@pytest.mark.integration
def test_wav_still_being_written_is_not_stored_until_complete_then_in_full(services) -> None:
    svc, tenant, recordings = services
    wav = recordings / "growing.wav"
    full, rest = partial_wav(wav, 64000, 19000)
    source = open_source(str(wav), [str(recordings)])
    row, _ = register_source(svc, source, tenant)
    try:
        with pytest.raises(errors.SourceIncomplete):
            store_recording(svc, row, source, tenant, worker=worker_id())
    finally:
        source.fileobj.close()
    assert wav.read_bytes() == full[: 44 + 19000]
    assert svc.db.recording(row.id).status == "pending"
    with wav.open("ab") as f:  # the recorder finishes the same file
        f.write(rest)
    source = open_source(str(wav), [str(recordings)])
    try:
        outcome = store_recording(svc, svc.db.recording(row.id), source, tenant, worker=worker_id())
    finally:
        source.fileobj.close()
    assert outcome.recording.id == row.id and outcome.plaintext_deleted
    assert not wav.exists()
    out = io.BytesIO()
    fetch_recording(svc, row.id, out, user_id="t")
    assert out.getvalue() == full
    # The one completeness rule (the sweep's too): header sizes against the file.
    head = full[:44]
    assert wav_state(head, len(full)) == "complete"
    assert wav_state(head, len(full) - 1) == "incomplete"
    assert wav_state(head[:4] + bytes(4) + head[8:40] + bytes(4), 44) == "incomplete"
    assert wav_state(b"", 0, "x.wav") == "incomplete"
    # Anything that is not a WAV (an .mp3) is stored as it always was.
    mp3 = recordings / "call.mp3"
    mp3.write_bytes(b"ID3\x04\x00" + os.urandom(5000))
    assert wav_state(mp3.read_bytes()[:4096], 5005, "call.mp3") == "not-wav"
    source = open_source(str(mp3), [str(recordings)])
    row, _ = register_source(svc, source, tenant)
    try:
        assert store_recording(svc, row, source, tenant, worker=worker_id()).plaintext_deleted
    finally:
        source.fileobj.close()
    assert not mp3.exists()


@pytest.mark.integration
def test_file_appended_between_store_and_delete_keeps_its_plaintext(services) -> None:
    svc, tenant, recordings = services
    wav = recordings / "late.wav"
    full = make_wav(wav, 0.5, seed=4)
    source = open_source(str(wav), [str(recordings)])
    row, _ = register_source(svc, source, tenant)
    real_mark_stored = svc.db.mark_stored

    def mark_then_append(*args, **kwargs):
        stored = real_mark_stored(*args, **kwargs)
        with wav.open("ab") as f:  # the writer was not done after all
            f.write(b"late audio" * 100)
        return stored

    svc.db.mark_stored = mark_then_append
    try:
        outcome = store_recording(svc, row, source, tenant, worker=worker_id())
    finally:
        source.fileobj.close()
        del svc.db.mark_stored
    assert outcome.recording.status == "stored"
    assert not outcome.plaintext_deleted and outcome.source_changed
    assert wav.read_bytes() == full + b"late audio" * 100


@pytest.mark.integration
def test_file_appended_while_read_is_not_marked_stored_and_is_retryable(services) -> None:
    svc, tenant, recordings = services
    wav = recordings / "reading.wav"
    full = make_wav(wav, 2.0, seed=5)
    source = open_source(str(wav), [str(recordings)])
    row, _ = register_source(svc, source, tenant)
    appended = False

    def append_once(_n: int) -> None:
        nonlocal appended
        if not appended:
            appended = True
            with wav.open("r+b") as f:  # rewrite in place, same size: only mtime moves
                f.seek(100)
                f.write(b"X" * 10)
            os.utime(wav, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))

    try:
        with pytest.raises(errors.SourceChanged) as info:
            store_recording(svc, row, source, tenant, worker=worker_id(), on_chunk=append_once)
    finally:
        source.fileobj.close()
    assert info.value.transient
    assert svc.db.recording(row.id).status == "pending"
    assert wav.exists() and len(wav.read_bytes()) == len(full)


@pytest.mark.integration
def test_daemon_requeues_a_file_appended_after_it_was_stored(tmp_path: Path, pg_dsn: str) -> None:
    import gevent

    from fsrecrypt.daemon import Daemon, Job

    config = local_config(tmp_path, pg_dsn, pipeline={"retry_base": 0.05, "retry_cap": 0.1})
    daemon = Daemon(config)
    svc = daemon.services
    key = unique("k")
    svc.keys.create_key(key)
    tenant = svc.db.add_tenant(unique("t"), key)
    wav = tmp_path / "recordings" / "late.wav"
    first = make_wav(wav, 0.5, seed=7)
    late = b"late audio" * 100
    real_mark_stored = svc.db.mark_stored

    def mark_then_append(*args, **kwargs):
        stored = real_mark_stored(*args, **kwargs)
        svc.db.mark_stored = real_mark_stored
        with wav.open("r+b") as f:  # the recorder appends more audio, then fixes the header
            f.seek(0, os.SEEK_END)
            f.write(late)
            f.seek(4)
            f.write(struct.pack("<I", len(first) + len(late) - 8))
            f.seek(40)
            f.write(struct.pack("<I", len(first) + len(late) - 44))
        return stored

    svc.db.mark_stored = mark_then_append
    try:
        job = Job(path=str(wav), tenant_name=tenant.name)
        daemon.jobs.busy.add(job.path)
        assert daemon.runner.attempt(job) is True  # re-queued: the path stays busy
        final = wav.read_bytes()
        assert final[44:] == first[44:] + late
        deadline = time.monotonic() + 5
        while daemon.jobs.queue.empty() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        again = daemon.jobs.queue.get_nowait()
        assert again.path == str(wav) and again.tenant_name == tenant.name
        assert daemon.runner.attempt(again) is False
        assert not wav.exists()
        rows = sorted(svc.db.recordings(source_path=str(wav)), key=lambda r: r.file_size_bytes)
        assert [r.status for r in rows] == ["stored", "stored"]
        out = io.BytesIO()
        fetch_recording(svc, rows[-1].id, out, user_id="t")
        assert out.getvalue() == final
    finally:
        svc.close()
