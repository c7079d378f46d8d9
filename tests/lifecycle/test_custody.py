"""Chain of custody: the evidence document, the keyed fingerprint, and --check."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import stat
import uuid
import wave
from pathlib import Path

import pytest
from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.config import load_config
from fsrecrypt.keys import LocalKeyring
from fsrecrypt.lifecycle.anchors import write_anchor
from fsrecrypt.pipeline import Services, fetch_recording, ingest_file
from fsrecrypt.pipeline.custody import FingerprintKey


def _wav(path: Path, seed: int) -> bytes:
    frames = bytes((i * 5 + seed * 31) & 0xFF for i in range(20000))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(frames)
    return path.read_bytes()


@pytest.fixture
def env(tmp_path: Path, pg_dsn: str):
    cfg = tmp_path / "fsrecrypt.toml"
    cfg.write_text(
        f'[database]\ndsn = "{pg_dsn}"\n'
        f'[keys]\nkeyring = "{tmp_path / "keys" / "keyring.json"}"\n'
        f'[storage]\npath = "{tmp_path / "objects"}"\n[pipeline]\nframe_size = 4096\n'
        f'[audit]\nanchor_dir = "{tmp_path / "anchors"}"\n'
        f'anchor_key_file = "{tmp_path / "keys" / "anchor.key"}"\n'
    )
    LocalKeyring(tmp_path / "keys" / "keyring.json").create_key("k1")
    services = Services(load_config(cfg))
    tenants = []
    for _ in range(2):
        name = f"c-{uuid.uuid4().hex[:10]}"
        services.db.add_tenant(name, "k1")
        tenants.append(name)
    yield cfg, services, tenants
    services.close()


def _cli(cfg: Path, *args: str):
    return CliRunner().invoke(main, ["-c", str(cfg), *args])


def test_custody_names_creation_storage_fingerprint_deletion_and_anchors(env, tmp_path) -> None:
    cfg, services, (tenant, _other) = env
    wav = tmp_path / "call.wav"
    original = _wav(wav, 1)
    outcome = ingest_file(services, str(wav), tenant, user_id="ops")
    rec_id = outcome.recording.id
    assert outcome.plaintext_deleted and not wav.exists()
    services.db.audit(
        action="stream",
        user_id="alice",
        success=True,
        recording_id=rec_id,
        tenant_id=outcome.recording.tenant_id,
    )
    write_anchor(services, user_id="test")
    run = _cli(cfg, "custody", rec_id)
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    assert doc["recording_id"] == rec_id and doc["status"] == "stored"
    assert doc["created"]["by"] == "upload or backfill (fsrecrypt ingest)"
    assert doc["stored"]["object_key"] == services.db.recording(rec_id).s3_path
    assert doc["stored"]["worker"].startswith(socket.gethostname() + ":")
    assert doc["stored"]["by_user"] == "ops"
    assert doc["plaintext_deleted"]["host"] == socket.gethostname()
    assert doc["plaintext_deleted"]["at"]
    fingerprint = doc["fingerprint"]["value"]
    assert len(fingerprint) == 64
    # Keyed: not the plain hash of the audio, and another tenant's key gives another value.
    assert fingerprint != hashlib.sha256(original).hexdigest()
    key = FingerprintKey.from_config(services.config, create=False)
    tenant_id = outcome.recording.tenant_id
    assert key.fingerprint(tenant_id, [original]) == fingerprint
    other_id = services.db.tenant_by_name(_other).id
    assert key.fingerprint(other_id, [original]) != fingerprint
    key_file = tmp_path / "keys" / "custody-fingerprint.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    actions = [e["action"] for e in doc["events"]]
    assert actions[:2] == ["encrypt", "stream"]
    assert all(e["anchor"] and e["anchor"]["seq"] == 1 for e in doc["events"][:2])
    assert services.db.audit_rows(recording_id=rec_id, action="custody")


def test_custody_check_matches_a_decrypted_copy_and_refuses_an_altered_one(env, tmp_path) -> None:
    cfg, services, (tenant, _other) = env
    wav = tmp_path / "call.wav"
    _wav(wav, 2)
    rec_id = ingest_file(services, str(wav), tenant, user_id="ops").recording.id
    out = io.BytesIO()
    fetch_recording(services, rec_id, out, user_id="test")
    copy = tmp_path / "copy.wav"
    copy.write_bytes(out.getvalue())
    run = _cli(cfg, "custody", rec_id, "--check", str(copy))
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["match"] is True
    altered = bytearray(out.getvalue())
    altered[-1] ^= 1
    copy.write_bytes(bytes(altered))
    run = _cli(cfg, "custody", rec_id, "--check", str(copy))
    assert run.exit_code == 1 and "does not match" in run.output
    checks = services.db.audit_rows(recording_id=rec_id, action="custody_check")
    assert [r["success"] for r in checks] == [True, False]
    copy.write_bytes(out.getvalue() + b"\x00")  # one trailing byte more
    assert _cli(cfg, "custody", rec_id, "--check", str(copy)).exit_code == 1


@pytest.mark.parametrize("bad", ["../../etc/passwd", "0" * 36, "١٢٣", "x\x00y"])
def test_custody_of_a_bad_id_is_a_typed_error(env, bad: str) -> None:
    cfg, _services, _tenants = env
    run = _cli(cfg, "custody", bad)
    assert run.exit_code != 0
    assert "Traceback" not in run.output and "no recording" in run.output


def _forget_fingerprint(services: Services, rec_id: str) -> str:
    """What a recording stored before fingerprints looks like: no HMAC, no key id."""
    with services.db.transaction() as cur:
        cur.execute(
            "UPDATE call_recordings SET plaintext_hmac = NULL, plaintext_hmac_key_id = NULL"
            " WHERE id = %s RETURNING (SELECT plaintext_hmac FROM call_recordings WHERE id = %s)",
            (rec_id, rec_id),
        )
        return str(cur.fetchone()[0])


def test_fill_missing_fingerprints_from_the_decrypted_object(env, tmp_path) -> None:
    cfg, services, (tenant, other) = env
    ids, originals = [], {}
    for seed, name in enumerate((tenant, tenant, other)):
        wav = tmp_path / f"old{seed}.wav"
        originals_bytes = _wav(wav, seed + 10)
        rec = ingest_file(services, str(wav), name, user_id="ops").recording
        originals[rec.id] = (originals_bytes, _forget_fingerprint(services, rec.id))
        ids.append(rec.id)

    run = _cli(cfg, "custody", "--fill-missing", "--tenant", tenant)
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert result == {"fingerprinted": 2, "skipped": 0, "failures": {}}
    for rec_id in ids[:2]:
        columns = services.db.custody_columns(rec_id)
        # The same HMAC the encryptor computed: decryption gives back exactly those bytes.
        assert columns["plaintext_hmac"] == originals[rec_id][1]
        assert columns["plaintext_hmac_source"] == "decrypted"
        doc = json.loads(_cli(cfg, "custody", rec_id).stdout)
        assert doc["fingerprint"]["computed"].startswith("from the authenticated decryption")
        assert any(e["action"] == "custody_fingerprint" for e in doc["events"])
        copy = tmp_path / f"{rec_id}.wav"
        copy.write_bytes(originals[rec_id][0])
        assert _cli(cfg, "custody", rec_id, "--check", str(copy)).exit_code == 0
    # The other tenant's recording was not touched; a second run does nothing more.
    assert services.db.custody_columns(ids[2])["plaintext_hmac"] is None
    again = json.loads(_cli(cfg, "custody", "--fill-missing", "--tenant", tenant).stdout)
    assert again["fingerprinted"] == 0
    # A fingerprint computed while encrypting says so.
    wav = tmp_path / "new.wav"
    _wav(wav, 99)
    fresh = ingest_file(services, str(wav), tenant, user_id="ops").recording
    doc = json.loads(_cli(cfg, "custody", fresh.id).stdout)
    assert doc["fingerprint"]["computed"] == "over the bytes read while the recording was encrypted"


def test_fill_missing_never_fingerprints_a_damaged_object(env, tmp_path) -> None:
    cfg, services, (tenant, _other) = env
    wav = tmp_path / "old.wav"
    _wav(wav, 3)
    rec = ingest_file(services, str(wav), tenant, user_id="ops").recording
    _forget_fingerprint(services, rec.id)
    obj = tmp_path / "objects" / (rec.s3_path or "")
    data = bytearray(obj.read_bytes())
    data[-100] ^= 0x01  # one bit in the last frame
    obj.chmod(0o600)
    obj.write_bytes(bytes(data))
    run = _cli(cfg, "custody", "--fill-missing")
    assert run.exit_code == 1
    result = json.loads(run.stdout)
    assert result["fingerprinted"] == 0 and rec.id in result["failures"]
    assert services.db.custody_columns(rec.id)["plaintext_hmac"] is None


@pytest.mark.parametrize(
    "args",
    [
        ("custody",),
        ("custody", "some-id", "--fill-missing"),
        ("custody", "some-id", "--tenant", "acme"),
    ],
)
def test_custody_refuses_ambiguous_requests(env, args) -> None:
    cfg, _services, _tenants = env
    run = _cli(cfg, *args)
    assert run.exit_code != 0 and "--fill-missing" in run.output
