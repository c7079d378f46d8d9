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

    say(
        f"Done in {time.monotonic() - started:.1f} s. Everything is under {DEMO.relative_to(ROOT)}/"
    )
    return 0


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
