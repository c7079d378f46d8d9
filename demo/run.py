"""`make demo`: the main job end to end on the embedded defaults.

Everything lives under ./.demo (keyring, object store, recordings directory)
plus a PostgreSQL database named ``fsrecrypt_demo``. Each step runs the real
``fsrecrypt`` command an operator would type and shows what it printed, then
checks the result (the demo fails loudly rather than printing a success it did
not verify).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
BIN = Path(sys.executable).parent
DSN = os.environ.get("FSRECRYPT_DEMO_DSN", "postgresql://postgres@127.0.0.1:5432/fsrecrypt_demo")

sys.path.insert(0, str(ROOT))


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*args: str, show: bool = True) -> str:
    cmd = [str(BIN / "fsrecrypt"), "-c", str(DEMO / "fsrecrypt.toml"), *args]
    if show:
        print("$ fsrecrypt " + " ".join(shlex.quote(a) for a in args), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        raise SystemExit(f"demo failed at: fsrecrypt {' '.join(args)}")
    if show and proc.stdout.strip():
        print("  " + proc.stdout.strip().replace("\n", "\n  "), flush=True)
    return proc.stdout


def write_config() -> None:
    from tests.support.factories import local_config
    from tests.support.factories import write_config as dump

    config = local_config(
        DEMO,
        DSN,
        pipeline={"frame_size": 65536},
        freeswitch={"recordings_dirs": (str(DEMO / "recordings"),)},
        metrics={"listen": "", "heartbeat_file": str(DEMO / "heartbeat")},
    )
    dump(DEMO / "fsrecrypt.toml", config)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    started = time.monotonic()
    if DEMO.exists():
        shutil.rmtree(DEMO)
    (DEMO / "recordings").mkdir(parents=True)
    write_config()
    from tests.support import pg

    pg.ensure_postgres()
    pg.drop_database("fsrecrypt_demo")

    say("1. A tenant key in the local keyring (0600, material never printed)")
    run("keys", "create", "acme-2026")
    run("keys", "list")

    say("2. The database schema")
    run("migrate", "--create-db")

    say("3. A tenant whose recordings are wrapped by that key")
    run("tenants", "add", "acme", "--key", "acme-2026")

    say("4. A 60-second 8 kHz mono recording, as FreeSWITCH writes it")
    from tests.support.factories import make_wav

    wav = DEMO / "recordings" / "6f1c9a4e-demo-call.wav"
    make_wav(wav, 60.0, seed=42)
    original_sha = sha256(wav)
    print(f"  {wav.relative_to(ROOT)}: {wav.stat().st_size} bytes, sha256 {original_sha[:16]}...")

    say("5. Ingest: pending row -> encrypt + store -> stored row + audit -> delete plaintext")
    result = json.loads(run("ingest", str(wav), "--tenant", "acme", "--call-uuid", "6f1c9a4e"))
    assert not wav.exists(), "the plaintext should be gone once stored"
    print("  plaintext deleted:", not wav.exists())

    say("6. The stored object is an AWS Encryption SDK message (v2, suite 0x0478, framed)")
    from fsrecrypt import format as esdk

    obj = DEMO / "objects" / result["object_key"]
    with obj.open("rb") as f:
        header = esdk.read_header(f)
    print(f"  object   {result['object_key']}  ({obj.stat().st_size} bytes)")
    print(f"  suite    0x{header.suite_id:04X}, frame length {header.frame_length}")
    print(f"  context  {header.encryption_context}")
    print(f"  data key wrapped by {header.encrypted_data_keys[0].provider_id}")

    say("7. Get it back (audit-logged) and compare")
    out = DEMO / "restored.wav"
    run("get", result["recording_id"], "-o", str(out))
    assert sha256(out) == original_sha, "restored audio differs from the original"
    print(f"  identical to the original: sha256 {sha256(out)[:16]}...")

    say("8. No lock-in: the official aws-encryption-sdk decrypts the object too")
    restored_by_sdk = decrypt_with_official_sdk(obj)
    assert hashlib.sha256(restored_by_sdk).hexdigest() == original_sha
    print("  aws_encryption_sdk.decrypt -> identical audio")

    say("9. The access log (hash-chained per tenant)")
    from fsrecrypt.db import Database

    db = Database(DSN)
    for row in db.audit_rows(recording_id=result["recording_id"]):
        print(
            f"  {row['accessed_at']:%H:%M:%S}  {row['action']:<9} {row['user_id']:<14} "
            f"success={row['success']}  hash={row['row_hash'][:12]}..."
        )
    db.close()

    daemon_part()

    say(
        f"Done in {time.monotonic() - started:.1f} s. Everything is under {DEMO.relative_to(ROOT)}/"
    )
    return 0


# --- part 2: the daemon beside a (simulated) FreeSWITCH ---------------------------------------


def daemon_part() -> None:
    """`fsrecrypt run` against the replaying ESL server, recordings arriving by RECORD_STOP.

    The simulated FreeSWITCH replays frames captured from a real FreeSWITCH
    1.10.12 (tests/support/eslserver.py), with each event's file path and
    tenant variable rewritten to the demo's files.
    """
    import signal
    import urllib.request
    import uuid

    from fsrecrypt.db import Database
    from tests.support.eslserver import EslServerProcess
    from tests.support.factories import local_config, make_wav
    from tests.support.factories import write_config as dump
    from tests.support.moto import free_port

    say("10. A simulated FreeSWITCH (replaying real Event Socket captures) and `fsrecrypt run`")
    esl = EslServerProcess(password="ClueCon")  # noqa: S106 - FreeSWITCH default, loopback test server
    metrics_port = free_port()
    config = local_config(
        DEMO,
        DSN,
        pipeline={"frame_size": 65536, "sweep_interval": 5.0, "quiet_period": 2.0},
        freeswitch={
            "recordings_dirs": (str(DEMO / "recordings"),),
            "port": esl.port,
            "liveness_interval": 2.0,
        },
        metrics={"listen": f"127.0.0.1:{metrics_port}", "heartbeat_file": str(DEMO / "heartbeat")},
    )
    dump(DEMO / "fsrecrypt.toml", config)
    log_path = DEMO / "daemon.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            [str(BIN / "fsrecrypt"), "-c", str(DEMO / "fsrecrypt.toml"), "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        if not esl.call("wait_subscribed", n=1, timeout=30.0):
            raise SystemExit(
                "the daemon did not subscribe to RECORD_STOP:\n" + log_path.read_text()
            )
        print(f"  ESL server on 127.0.0.1:{esl.port}; daemon pid {daemon.pid} subscribed")

        say("11. FreeSWITCH fires RECORD_STOP for four calls (and one forged event)")
        recordings = DEMO / "recordings"
        originals: dict[str, bytes] = {}
        calls = [
            ("record_stop.esl", "mono, record_session", 1, 30.0),
            ("stereo_record_stop.esl", "stereo, RECORD_STEREO=true", 2, 30.0),
            ("uuid_record_record_stop.esl", "uuid_record on a live call", 1, 20.0),
        ]
        for fixture, what, channels, seconds in calls:
            path = recordings / f"{uuid.uuid4()}.wav"
            originals[str(path)] = make_wav(path, seconds, channels=channels, seed=len(originals))
            esl.call(
                "emit_fixture",
                name=fixture,
                overrides={"Record-File-Path": str(path), "variable_fsrecrypt_tenant": "acme"},
            )
            print(f"  RECORD_STOP  {what:<28} {path.name}")
        short = recordings / f"{uuid.uuid4()}.wav"  # FreeSWITCH already deleted it
        esl.call(
            "emit_fixture",
            name="min_sec_record_stop.esl",
            overrides={"Record-File-Path": str(short), "variable_fsrecrypt_tenant": "acme"},
        )
        print(f"  RECORD_STOP  {'record_min_sec: too short':<28} {short.name} (deleted by FS)")
        esl.call(
            "emit_fixture",
            name="record_stop.esl",
            overrides={"Record-File-Path": "/etc/passwd", "variable_fsrecrypt_tenant": "acme"},
        )
        print(f"  RECORD_STOP  {'forged: path /etc/passwd':<28} (must be refused)")

        db = Database(DSN)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = [r for p in [*originals, str(short)] for r in db.recordings(source_path=p)]
            done = [r for r in rows if r.status in ("stored", "discarded")]
            if len(done) == len(originals) + 1:
                break
            time.sleep(0.2)
        else:
            raise SystemExit("recordings were not stored in time:\n" + log_path.read_text()[-3000:])

        say("12. What the daemon recorded (plaintext deleted only after the row is stored)")
        for r in rows:
            wav = r.encryption_metadata.get("wav", {})
            print(
                f"  {r.status:<9} {Path(r.source_path).name:<42} "
                f"{r.file_size_bytes or 0:>8} B  {wav.get('channels', '-')} ch "
                f"{wav.get('duration_s', '-')} s  file on disk: {Path(r.source_path).exists()}"
            )
        stored = [r for r in rows if r.status == "stored"]
        assert all(not Path(r.source_path).exists() for r in stored)
        events = [json.loads(line) for line in log_path.read_text().splitlines() if line[:1] == "{"]
        refused = [e for e in events if e.get("event") == "event.refused"]
        assert refused, "the forged /etc/passwd event was not refused"
        print(f"  refused ({refused[0].get('reason')}): {refused[0].get('error')}")
        line = next(
            e for e in events if e.get("event") == "recording" and e.get("outcome") == "stored"
        )
        print("  one JSON log line per recording:")
        print("  " + json.dumps({k: v for k, v in line.items() if k != "timestamp"})[:300])

        say("13. Each stored recording decrypts to the original bytes")
        for r in stored:
            out = DEMO / f"restored-{r.id}.wav"
            run("get", r.id, "-o", str(out), show=r is stored[0])
            assert out.read_bytes() == originals[r.source_path], r.source_path
        print(f"  {len(stored)} of {len(stored)} identical")

        say("14. Operations: health and Prometheus metrics")
        health = subprocess.run(
            [str(BIN / "fsrecrypt"), "-c", str(DEMO / "fsrecrypt.toml"), "health"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        print(f"$ fsrecrypt health   (exit {health.returncode})")
        print("  " + (health.stdout or health.stderr).strip().replace("\n", "\n  "))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        wanted = (
            "fsrecrypt_recordings_total{",
            "fsrecrypt_esl_connected",
            "fsrecrypt_refused_events_total{",
        )
        for metric in metrics.splitlines():
            if metric.startswith(wanted):
                print("  " + metric)
        db.close()
    finally:
        say("15. SIGTERM: the daemon finishes in-flight work and exits 0")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
        esl.close()
        print(f"  daemon exit code {code}")
        assert code == 0, log_path.read_text()[-3000:]


def decrypt_with_official_sdk(obj: Path) -> bytes:
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import (
        CommitmentPolicy,
        EncryptionKeyType,
        WrappingAlgorithm,
    )
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

    ring = json.loads((DEMO / "keyring.json").read_text())["keys"]

    class Keyring(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = "fsrecrypt-local"

        def _get_raw_key(self, key_id: bytes) -> WrappingKey:
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=base64.b64decode(ring[key_id.decode()]["material"]),
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    provider = Keyring()
    provider.add_master_key(b"acme-2026")
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    plaintext, _header = client.decrypt(source=obj.read_bytes(), key_provider=provider)
    return bytes(plaintext)


if __name__ == "__main__":
    sys.exit(main())
