"""Issue 7, defect 11: `fsrecrypt get`/`decrypt` killed mid-write leave no plaintext behind.

Each command runs as a real subprocess on a large recording and is killed
while its output grows; the output directory must then hold exactly what it
held before. Where the filesystem supports O_TMPFILE the output has no name
at all until it is complete (so SIGKILL too leaves nothing); the named
fallback (simulated: O_TMPFILE refused with EOPNOTSUPP, as on a filesystem
without it) removes its temp file on SIGTERM and SIGHUP.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsrecrypt.pipeline import Services, ingest_file
from tests.support.factories import local_config, unique, write_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PLAINTEXT_BYTES = 128 << 20
PREEXISTING = {"notes.txt": b"kept as it was\n", "earlier.wav": b"RIFF an earlier download"}


class Big:
    def __init__(
        self, root: Path, config: Path, recording_id: str, object_path: Path, sha256: str
    ) -> None:
        self.root = root
        self.config = config
        self.recording_id = recording_id
        self.object_path = object_path
        self.sha256 = sha256


@pytest.fixture(scope="module")
def big(tmp_path_factory, pg_dsn: str) -> Big:
    """One 128 MiB recording, stored (local keyring + store) and registered in the database."""
    root = tmp_path_factory.mktemp("cli-signals")
    config = local_config(root, pg_dsn, pipeline={"frame_size": 65536})
    services = Services(config)
    try:
        key = unique("sig-key")
        services.keys.create_key(key)
        tenant = services.db.add_tenant(unique("sig-tenant"), key)
        wav = root / "recordings" / "long-call.wav"
        data_size = PLAINTEXT_BYTES - 44
        header = b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE"
        header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16)
        header += b"data" + struct.pack("<I", data_size)
        digest = hashlib.sha256(header)
        with open(wav, "wb") as out:
            out.write(header)
            for size in [1 << 24] * (data_size >> 24) + [data_size & ((1 << 24) - 1)]:
                chunk = os.urandom(size)
                digest.update(chunk)
                out.write(chunk)
        outcome = ingest_file(services, str(wav), tenant.name, user_id="test")
        object_path = Path(config.storage.path) / outcome.object_key
    finally:
        services.close()
    config_path = write_config(root / "fsrecrypt.toml", config)
    return Big(root, config_path, outcome.recording.id, object_path, digest.hexdigest())


def output_dir(tmp_path: Path) -> Path:
    out = tmp_path / "downloads"
    out.mkdir()
    for name, content in PREEXISTING.items():
        (out / name).write_bytes(content)
    return out


def fds_into(pid: int, directory: Path) -> list[int]:
    """Sizes of the files under ``directory`` the process has open (named or not)."""
    sizes = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            target = os.readlink(entry)
            if target.startswith(str(directory) + "/"):
                sizes.append(os.stat(entry).st_size)
        except OSError:
            continue
    return sizes


def kill_mid_write(cmd: list[str], out: Path, signum: int) -> tuple[int, list[str], str]:
    """Run ``cmd``, send ``signum`` once its output holds some MiB; (status, names then, stderr)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ)
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            sizes = fds_into(proc.pid, out)
            if sizes and max(sizes) >= 4 << 20:
                break
            assert proc.poll() is None, "the command ended before it was interrupted"
            assert time.monotonic() < deadline, "the command never started writing"
            time.sleep(0.002)
        assert max(sizes) < PLAINTEXT_BYTES, "the output was already complete"
        names_while_writing = sorted(os.listdir(out))
        proc.send_signal(signum)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, names_while_writing, stderr.decode(errors="replace")


def assert_untouched(out: Path) -> None:
    assert sorted(os.listdir(out)) == sorted(PREEXISTING), "a (partial) output file was left"
    for name, content in PREEXISTING.items():
        assert (out / name).read_bytes() == content


def fsrecrypt_cmd(big: Big, *args: str) -> list[str]:
    return [sys.executable, "-m", "fsrecrypt.cli", "-c", str(big.config), *args]


SIGNALS = [
    pytest.param(signal.SIGTERM, id="SIGTERM"),
    pytest.param(signal.SIGHUP, id="SIGHUP"),
    pytest.param(signal.SIGKILL, id="SIGKILL"),
]


@pytest.mark.parametrize("signum", SIGNALS)
@pytest.mark.parametrize("command", ["get", "decrypt"])
def test_killed_command_leaves_no_plaintext(big: Big, tmp_path: Path, command: str, signum) -> None:
    out = output_dir(tmp_path)
    # The second run writes over an existing file: it must survive the kill intact.
    for target in (out / "call.wav", out / "earlier.wav"):
        if command == "get":
            cmd = fsrecrypt_cmd(big, "get", big.recording_id, "-o", str(target))
        else:
            cmd = fsrecrypt_cmd(big, "decrypt", str(big.object_path), str(target))
        status, names_while_writing, stderr = kill_mid_write(cmd, out, signum)
        assert status == -signum, stderr  # it died of the signal, mid-write
        assert_untouched(out)
        # O_TMPFILE: the partial output never had a name, not even while written.
        assert names_while_writing == sorted(PREEXISTING)


FALLBACK = """
import errno, os, sys
real_open = os.open

def no_tmpfile(path, flags, *args, **kwargs):
    if flags & os.O_TMPFILE == os.O_TMPFILE:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
    return real_open(path, flags, *args, **kwargs)

os.open = no_tmpfile
from fsrecrypt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_named_fallback_is_removed_on_signal(big: Big, tmp_path: Path, signum) -> None:
    out = output_dir(tmp_path)
    for command in ("decrypt", "get"):
        target = out / f"{command}.wav"
        args = (
            ["decrypt", str(big.object_path), str(target)]
            if command == "decrypt"
            else ["get", big.recording_id, "-o", str(target)]
        )
        cmd = [sys.executable, "-c", FALLBACK, "-c", str(big.config), *args]
        status, names_while_writing, stderr = kill_mid_write(cmd, out, signum)
        assert status == -signum, stderr
        # The partial output is gone once the signal arrived ...
        assert_untouched(out)
        # ... though without O_TMPFILE it had a (hidden) name while it was written.
        partial = [n for n in names_while_writing if n not in PREEXISTING]
        assert len(partial) == 1 and partial[0].startswith(f".{command}.wav.")
    # The fallback still produces the whole file when left alone.
    whole = out / "whole.wav"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            FALLBACK,
            "-c",
            str(big.config),
            "get",
            big.recording_id,
            "-o",
            str(whole),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert whole.stat().st_size == PLAINTEXT_BYTES and whole.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(out)) == sorted([*PREEXISTING, "whole.wav"])


def test_dash_writes_plaintext_to_stdout_and_nothing_to_disk(big: Big, tmp_path: Path) -> None:
    for args in (["get", big.recording_id, "-o", "-"], ["decrypt", str(big.object_path), "-"]):
        proc = subprocess.Popen(
            fsrecrypt_cmd(big, *args),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        digest = hashlib.sha256()
        assert proc.stdout is not None and proc.stderr is not None
        while chunk := proc.stdout.read(1 << 20):
            digest.update(chunk)
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0, stderr
        assert digest.hexdigest() == big.sha256
        # The summary line goes to stderr, so the plaintext stream stays clean.
        assert json.loads(stderr.strip().splitlines()[-1])["out"] == "-"
        assert os.listdir(tmp_path) == []
