"""Rotation with KMS ReEncrypt and erasure of every S3 object version, against moto.

moto runs as a separate server process (tests/support/moto.py); fsrecrypt
talks to it over HTTP exactly as it talks to AWS. The KMS calls are observed
through botocore's own event hooks on the provider's real client.
"""

from __future__ import annotations

import io
import json
import uuid
import wave
from pathlib import Path

import pytest
from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.config import load_config
from fsrecrypt.errors import RecordingGone
from fsrecrypt.format import parse_header
from fsrecrypt.lifecycle.erase import erase_recordings
from fsrecrypt.lifecycle.rotate import rotate_tenant
from fsrecrypt.lifecycle.verify import verify_recordings
from fsrecrypt.pipeline import Services, fetch_recording, ingest_file, open_recording


def _wav(path: Path, seed: int, seconds: float = 1.0) -> bytes:
    frames = bytes((i * 11 + seed * 17 + (i >> 7)) & 0xFF for i in range(int(16000 * seconds)))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(frames)
    return path.read_bytes()


def _config(tmp: Path, dsn: str, moto_url: str, bucket: str | None) -> Path:
    storage = (
        f'[storage]\nbackend = "s3"\nbucket = "{bucket}"\nendpoint_url = "{moto_url}"\n'
        if bucket
        else f'[storage]\npath = "{tmp / "objects"}"\n'
    )
    cfg = tmp / "fsrecrypt.toml"
    cfg.write_text(
        f'[database]\ndsn = "{dsn}"\n'
        f'[keys]\nprovider = "aws-kms"\nendpoint_url = "{moto_url}"\n'
        f'keyring = "{tmp / "keyring.json"}"\n'
        f"{storage}[pipeline]\nframe_size = 4096\n"
    )
    return cfg


def _ingest(services: Services, tmp: Path, tenant: str, n: int) -> dict[str, bytes]:
    originals = {}
    for i in range(n):
        wav = tmp / f"in{i}.wav"
        data = _wav(wav, i)
        outcome = ingest_file(services, str(wav), tenant, user_id="test")
        originals[outcome.recording.id] = data
    return originals


def _decrypt(cfg: Path, rec_id: str) -> bytes:
    services = Services(load_config(cfg))
    try:
        out = io.BytesIO()
        fetch_recording(services, rec_id, out, user_id="test")
        return out.getvalue()
    finally:
        services.close()


def test_kms_rotation_uses_reencrypt(tmp_path: Path, pg_dsn: str, moto_server, kms_key) -> None:
    cfg = _config(tmp_path, pg_dsn, moto_server.endpoint_url, None)
    new_key = moto_server.client("kms").create_key(Description="new")["KeyMetadata"]["Arn"]
    services = Services(load_config(cfg))
    try:
        tenant = f"kms-{uuid.uuid4().hex[:8]}"
        services.db.add_tenant(tenant, kms_key)
        originals = _ingest(services, tmp_path, tenant, 3)
        calls: list[str] = []
        services.keys.client.meta.events.register(
            "before-call.kms", lambda model, **_: calls.append(model.name)
        )
        summary = rotate_tenant(services, tenant, new_key, user_id="ops")
        assert summary.rewrapped == 3 and not summary.failures and summary.remaining == 0
        assert calls.count("ReEncrypt") == 3
        assert "Decrypt" not in calls  # the data key never left KMS
        for rec_id, data in originals.items():
            row = services.db.recording(rec_id)
            assert row.kms_key_id == new_key
            assert _decrypt(cfg, rec_id) == data
        # Rerun: nothing to re-wrap, so no further ReEncrypt.
        calls.clear()
        again = rotate_tenant(services, tenant, new_key, user_id="ops")
        assert again.rewrapped == 0 and calls.count("ReEncrypt") == 0

        # Headers too: afterwards nothing refers to the old key any more.
        rewritten = rotate_tenant(services, tenant, new_key, rewrite_headers=True, user_id="ops")
        assert rewritten.headers_rewritten == 3
        for rec_id, data in originals.items():
            assert _decrypt(cfg, rec_id) == data
            raw = tmp_path / "objects" / services.db.recording(rec_id).s3_path
            # (moto does not refuse a disabled key, so check the header itself:
            # its only wrapped data key is the new key's.)
            header = parse_header(raw.read_bytes())
            assert [e.provider_info.decode() for e in header.encrypted_data_keys] == [new_key]
            out = tmp_path / f"{rec_id}.wav"
            run = CliRunner().invoke(
                main, ["-c", str(cfg), "decrypt", str(raw), str(out)], catch_exceptions=False
            )
            assert run.exit_code == 0, run.output
            assert out.read_bytes() == data
        report = verify_recordings(services, user_id="ops", tenant_name=tenant)
        assert report.ok == 3 and not report.failures
    finally:
        services.close()


def test_erase_deletes_every_s3_version(
    tmp_path: Path, pg_dsn: str, moto_server, kms_key, versioned_s3_bucket
) -> None:
    bucket = versioned_s3_bucket
    cfg = _config(tmp_path, pg_dsn, moto_server.endpoint_url, bucket.name)
    services = Services(load_config(cfg))
    try:
        tenant = f"s3-{uuid.uuid4().hex[:8]}"
        services.db.add_tenant(tenant, kms_key)
        originals = _ingest(services, tmp_path, tenant, 2)
        victim, keep = list(originals)
        key = services.db.recording(victim).s3_path
        # A second version (e.g. an operator's accidental re-upload) and a delete marker.
        bucket.client.put_object(Bucket=bucket.name, Key=key, Body=b"older copy")
        bucket.client.delete_object(Bucket=bucket.name, Key=key)
        before = bucket.client.list_object_versions(Bucket=bucket.name, Prefix=key)
        assert len(before.get("Versions", [])) == 2 and len(before.get("DeleteMarkers", [])) == 1

        receipt = erase_recordings(
            services,
            [services.db.recording(victim)],
            reason="GDPR request 9",
            user_id="dpo",
            override_retention=True,
        )
        assert receipt["versions_deleted"] == 3 and receipt["object_keys"] == [key]
        after = bucket.client.list_object_versions(Bucket=bucket.name, Prefix=key)
        assert not after.get("Versions") and not after.get("DeleteMarkers")
        row = services.db.recording(victim)
        assert row.status == "erased" and row.encrypted_dek is None
        with pytest.raises(RecordingGone):
            open_recording(services, row)
        actions = [r["action"] for r in services.db.audit_rows(recording_id=victim)]
        assert actions[0] == "encrypt" and actions[-1] == "erase"  # history kept
        assert _decrypt(cfg, keep) == originals[keep]
        with services.db.transaction() as cur:
            cur.execute(
                "SELECT receipt, receipt_hash FROM erasure_receipts WHERE id = %s",
                (receipt["receipt_id"],),
            )
            stored, stored_hash = cur.fetchone()
        assert stored == json.loads(json.dumps(receipt)) and stored_hash == receipt["receipt_hash"]
    finally:
        services.close()
