"""Escrow keys: a second way back into every recording (issue 9, part 2).

KMS runs in its own moto server process with AWS's key-state rule added
(``tests/support/moto_variants.py``: moto 5.2 itself still decrypts with a
disabled key), so "the primary key is disabled" is what the code under test
really meets, in this process, in ``fsrecrypt get`` and in a ``fsrecrypt
serve`` child process alike. The escrow keys are a KMS key in another
region (eu-west-1) and a raw AES key in an escrow keyring file; the official
aws-encryption-sdk, given only one escrow key, decrypts the stored object.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aws_encryption_sdk
import boto3
import botocore.session
import pytest
from aws_encryption_sdk.identifiers import CommitmentPolicy, EncryptionKeyType, WrappingAlgorithm
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider
from click.testing import CliRunner

from fsrecrypt import pipeline
from fsrecrypt.cli import main
from fsrecrypt.config import Config, with_overrides
from fsrecrypt.errors import KeyAccessError, KeyNotFound
from fsrecrypt.format import parse_header
from fsrecrypt.keys import LocalKeyring
from fsrecrypt.keys.escrow import EscrowKeys, parse_escrow_ref
from fsrecrypt.pipeline.escrow import add_tenant_with_escrow
from fsrecrypt.web import create_api_key
from tests.support.factories import make_wav, write_config
from tests.support.moto import free_port
from tests.support.moto_variants import kms_state_server  # noqa: F401 - fixture
from tests.support.serve import serve_process

pytestmark = pytest.mark.integration

ESCROW_REGION = "eu-west-1"
RAW = "cust-escrow"


def _config(root: Path, dsn: str, kms_url: str | None) -> Config:
    (root / "recordings").mkdir(parents=True, exist_ok=True)
    keys = (
        {"provider": "aws-kms", "endpoint_url": kms_url, "region": "us-east-1"}
        if kms_url
        else {"provider": "local"}
    )
    return with_overrides(
        Config(),
        database={"dsn": dsn},
        keys={
            **keys,
            "keyring": str(root / "keyring.json"),
            "escrow_keyring": str(root / "escrow" / "escrow-keyring.json"),
        },
        storage={"backend": "local", "path": str(root / "objects")},
        pipeline={"frame_size": 4096},
        playback={"signing_key_file": str(root / "secrets" / "url.key"), "url_ttl": 900},
        freeswitch={"recordings_dirs": (str(root / "recordings"),)},
    )


def _cli(cfg: Path, *args: str) -> tuple[int, str]:
    run = CliRunner().invoke(main, ["-c", str(cfg), *args])
    return run.exit_code, run.output


def _ingest(services: pipeline.Services, root: Path, tenant: str, seed: int) -> tuple[str, bytes]:
    path = root / "recordings" / f"{uuid.uuid4().hex}.wav"
    data = make_wav(path, 1.5, seed=seed)
    outcome = pipeline.ingest_file(services, str(path), tenant, user_id="test")
    return outcome.recording.id, data


def _raw_sdk_provider(keyring_path: Path, key_id: str) -> RawMasterKeyProvider:
    material = base64.b64decode(json.loads(keyring_path.read_text())["keys"][key_id]["material"])

    class CustomerRing(RawMasterKeyProvider):
        provider_id = "fsrecrypt-local"

        def _get_raw_key(self, wanted: bytes) -> WrappingKey:
            assert wanted == key_id.encode()
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=material,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    ring = CustomerRing()
    ring.add_master_key(key_id.encode())
    return ring


def _sdk_decrypt(provider, message: bytes) -> bytes:
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    plaintext, _header = client.decrypt(source=message, key_provider=provider)
    return bytes(plaintext)


def test_disabled_primary_kms_key_plays_through_escrow(
    tmp_path: Path,
    pg_dsn: str,
    kms_state_server,  # noqa: F811 - the fixture
) -> None:
    kms_url = kms_state_server.endpoint_url
    config = _config(tmp_path, pg_dsn, kms_url)
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    primary_meta = kms_state_server.client("kms").create_key()["KeyMetadata"]
    primary = primary_meta["Arn"]
    eu_kms = boto3.client("kms", region_name=ESCROW_REGION, endpoint_url=kms_url)
    escrow_meta = eu_kms.create_key()["KeyMetadata"]
    escrow_arn = escrow_meta["Arn"]
    assert f":{ESCROW_REGION}:" in escrow_arn
    escrow_ring = tmp_path / "escrow" / "escrow-keyring.json"
    LocalKeyring(escrow_ring).create_key(RAW)

    tenant = f"esc-{uuid.uuid4().hex[:8]}"
    code, out = _cli(
        cfg, "tenants", "add", tenant, "--key", primary,
        "--escrow-key", escrow_arn, "--escrow-key", f"raw-aes:{RAW}",
    )  # fmt: skip
    assert code == 0, out
    assert json.loads(out)["escrow_keys"] == [escrow_arn, f"raw-aes:{RAW}"]
    listed = [line.split("\t") for line in _cli(cfg, "tenants", "list")[1].splitlines()]
    assert [r[4] for r in listed if r[0] == tenant] == [f"{escrow_arn},raw-aes:{RAW}"]
    plain_tenant = f"noesc-{uuid.uuid4().hex[:8]}"
    assert _cli(cfg, "tenants", "add", plain_tenant, "--key", primary)[0] == 0

    services = pipeline.Services(config)
    try:
        rid, original = _ingest(services, tmp_path, tenant, 1)
        plain_rid, _ = _ingest(services, tmp_path, plain_tenant, 2)
        rec = services.db.recording(rid)
        blob = (tmp_path / "objects" / rec.s3_path).read_bytes()
        header = parse_header(blob)
        # One EDK per key, primary first, in the header and in the database.
        edks = header.encrypted_data_keys
        assert len(edks) == 3
        assert [edks[0].provider_info.decode(), edks[1].provider_info.decode()] == [
            primary,
            escrow_arn,
        ]
        assert edks[2].provider_id == "fsrecrypt-local"
        assert [ref for ref, _ in services.db.escrow_deks(rid)] == [escrow_arn, f"raw-aes:{RAW}"]

        # The official ESDK, given only one escrow key, decrypts the object.
        assert _sdk_decrypt(_raw_sdk_provider(escrow_ring, RAW), blob) == original
        saved = os.environ.get("AWS_ENDPOINT_URL")
        os.environ["AWS_ENDPOINT_URL"] = kms_url
        try:
            kms_only = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
                key_ids=[escrow_arn], botocore_session=botocore.session.Session()
            )
            assert _sdk_decrypt(kms_only, blob) == original
        finally:
            if saved is None:
                os.environ.pop("AWS_ENDPOINT_URL", None)
            else:
                os.environ["AWS_ENDPOINT_URL"] = saved

        kms_state_server.client("kms").disable_key(
            KeyId=primary_meta["KeyId"]
        )  # (moto wants the id)

        # Control: a tenant without escrow cannot be played any more.
        code, out = _cli(cfg, "get", plain_rid, "-o", str(tmp_path / "plain.wav"))
        assert code != 0 and "DisabledException" in out, out

        # `fsrecrypt get` opens it through the first escrow key, and says so.
        code, out = _cli(cfg, "get", rid, "-o", str(tmp_path / "out.wav"), "--user", "ops")
        assert code == 0, out
        assert (tmp_path / "out.wav").read_bytes() == original
        row = services.db.audit_rows(recording_id=rid, action="download")[-1]
        assert row["success"] and row["details"]["wrapping_key"] == escrow_arn
        assert row["details"]["escrow"] is True
        assert "DisabledException" in row["details"]["primary_error"]

        # The web /stream (a `fsrecrypt serve` child process) too, full and ranged.
        _row, api_key = create_api_key(services, tenant, "supervisor@example.com")
        with serve_process(cfg, tmp_path / "serve.log") as (port, _pid):
            for extra, want in (({}, original), ({"Range": "bytes=100-4999"}, original[100:5000])):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request(
                    "GET", f"/v1/recordings/{rid}/stream", headers={"X-API-Key": api_key, **extra}
                )
                resp = conn.getresponse()
                assert resp.status in (200, 206), resp.read()
                assert resp.read() == want
                conn.close()
            deadline = time.monotonic() + 30  # the row is written when the stream closes
            while len(services.db.audit_rows(recording_id=rid, action="stream")) < 2:
                assert time.monotonic() < deadline, "no audit row for each stream"
                time.sleep(0.1)
        streams = services.db.audit_rows(recording_id=rid, action="stream")
        assert len(streams) == 2
        for row in streams:
            assert row["success"], row
            assert row["details"]["wrapping_key"] == escrow_arn
            assert row["details"]["escrow"] is True

        # verify --escrow: every escrow key opens every recording of the tenant...
        code, out = _cli(cfg, "verify", "--escrow", "--tenant", tenant)
        assert code == 0, out
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["ok"] == 1 and summary["failed"] == 0
        assert summary["keys"] == {
            escrow_arn: {"ok": 1, "failed": 0},
            f"raw-aes:{RAW}": {"ok": 1, "failed": 0},
        }
        # ... and finds an escrow key that no longer works before the day it is needed.
        eu_kms.disable_key(KeyId=escrow_meta["KeyId"])
        code, out = _cli(cfg, "verify", "--escrow", "--tenant", tenant)
        assert code != 0
        assert f"FAIL {rid}" in out and escrow_arn in out and "DisabledException" in out
        # With both KMS keys disabled the customer's offline AES key still opens it.
        code, out = _cli(cfg, "get", rid, "-o", str(tmp_path / "out2.wav"))
        assert code == 0, out
        assert (tmp_path / "out2.wav").read_bytes() == original
        row = services.db.audit_rows(recording_id=rid, action="download")[-1]
        assert row["details"]["wrapping_key"] == f"raw-aes:{RAW}"

        # KMS unreachable (its region down): the offline key still opens it, at once.
        dead = with_overrides(config, keys={"endpoint_url": f"http://127.0.0.1:{free_port()}"})
        dead_cfg = write_config(tmp_path / "dead.toml", dead)
        code, out = _cli(dead_cfg, "get", rid, "-o", str(tmp_path / "out3.wav"))
        assert code == 0, out
        assert (tmp_path / "out3.wav").read_bytes() == original
        row = services.db.audit_rows(recording_id=rid, action="download")[-1]
        assert row["details"]["wrapping_key"] == f"raw-aes:{RAW}"
        assert "cannot reach KMS" in row["details"]["primary_error"]
    finally:
        services.close()


def test_set_keys_adds_and_removes_escrow_copies_resumably(tmp_path: Path, pg_dsn: str) -> None:
    config = _config(tmp_path, pg_dsn, None)
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    services = pipeline.Services(config)
    try:
        primary = services.keys.create_key(f"p-{uuid.uuid4().hex[:6]}")
        escrow_ring = LocalKeyring(tmp_path / "escrow" / "escrow-keyring.json")
        escrow_ring.create_key(RAW)
        escrow_ring.create_key("second")
        tenant = f"sk-{uuid.uuid4().hex[:8]}"
        pipeline.add_tenant(services, tenant, primary)
        originals = dict(_ingest(services, tmp_path, tenant, i) for i in range(3))
        ids = list(originals)
        assert all(services.db.escrow_deks(rid) == [] for rid in ids)

        # Hostile or wrong names are refused before anything changes.
        for bad in ("arn:aws:kms:us-east-1:1:key/x", "raw-aes:../../etc", "alias/x", primary):
            code, out = _cli(
                cfg, "tenants", "set-keys", tenant, "--key", primary, "--escrow-key", bad
            )
            assert code != 0, (bad, out)
        code, out = _cli(
            cfg, "tenants", "set-keys", tenant, "--key", primary, "--escrow-key", "raw-aes:missing"
        )
        assert code != 0 and "missing" in out
        assert services.db.tenant_by_name(tenant).escrow_key_ids == ()

        both = ["--escrow-key", f"raw-aes:{RAW}", "--escrow-key", "raw-aes:second"]
        code, out = _cli(cfg, "tenants", "set-keys", tenant, "--key", primary, *both)
        assert code == 0, out
        summary = json.loads(out)
        assert summary["escrow_rewrapped"] == 3 and summary["remaining"] == 0
        # Rerun: nothing left to do.
        code, out = _cli(cfg, "tenants", "set-keys", tenant, "--key", primary, *both)
        assert code == 0 and json.loads(out)["escrow_rewrapped"] == 0

        # Old objects: the database copies open them; their headers do not carry escrow EDKs.
        code, out = _cli(cfg, "verify", "--escrow", "--tenant", tenant)
        assert code == 0, out
        report = json.loads(out.strip().splitlines()[-1])
        assert report["ok"] == 3 and report["header_without_escrow"] == 3
        # rotate --rewrite-headers writes headers carrying every escrow EDK.
        assert _cli(cfg, "rotate", "--tenant", tenant, "--to", primary, "--rewrite-headers")[0] == 0
        for rid in ids:
            rec = services.db.recording(rid)
            header = parse_header((tmp_path / "objects" / rec.s3_path).read_bytes())
            assert len(header.encrypted_data_keys) == 3
        code, out = _cli(cfg, "verify", "--escrow", "--tenant", tenant)
        assert code == 0 and json.loads(out.strip().splitlines()[-1])["header_without_escrow"] == 0

        # The primary key is lost: reads go through the escrow copies.
        ring = json.loads((tmp_path / "keyring.json").read_text())
        del ring["keys"][primary]
        (tmp_path / "keyring.json").write_text(json.dumps(ring))
        for rid in ids:
            code, out = _cli(cfg, "get", rid, "-o", str(tmp_path / f"{rid}.esc"))
            assert code == 0, out
            assert (tmp_path / f"{rid}.esc").read_bytes() == originals[rid]
        # A tampered escrow copy is tampering, not a key outage.
        with services.db.transaction() as cur:
            cur.execute(
                "UPDATE recording_escrow_deks SET encrypted_dek = %s"
                " WHERE recording_id = %s AND key_ref = %s",
                (
                    base64.b64encode(
                        pipeline.edk_to_bytes(
                            escrow_ring.generate_data_key(RAW, {"x": "y"}).encrypted
                        )
                    ).decode(),
                    ids[0],
                    f"raw-aes:{RAW}",
                ),
            )
        code, out = _cli(cfg, "get", ids[0], "-o", str(tmp_path / "t.wav"))
        assert code != 0 and "does not authenticate" in out, out

        # Erasure shreds the escrow copies with the primary one.
        code, out = _cli(
            cfg, "erase", "--recording", ids[1], "--reason", "t", "--yes", "--override-retention"
        )
        assert code == 0, out
        assert services.db.escrow_deks(ids[1]) == []
        assert len(services.db.escrow_deks(ids[2])) == 2
    finally:
        services.close()


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "raw-aes:",
        "raw-aes:a b",
        "raw-aes:" + "x" * 200,
        "arn:aws:kms:us-east-1:123456789012:key/",
        "arn:aws:kms:../../:123456789012:key/abc",
        "arn:aws:s3:::bucket",
        "kms:abc",
        "arn:aws:kms:us-east-1:123456789012:key/abc\n",
    ],
)
def test_escrow_refs_are_strict(ref: str) -> None:
    with pytest.raises(KeyAccessError):
        parse_escrow_ref(ref)


def test_escrow_refs_accepted() -> None:
    assert parse_escrow_ref("raw-aes:cust.escrow-1") == ("raw-aes", "", "cust.escrow-1")
    arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert parse_escrow_ref(arn) == ("kms", "eu-west-1", arn)


def _subprocess_cli(cfg: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from fsrecrypt.cli import main; main()", "-c", str(cfg), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_set_keys_killed_midway_resumes(tmp_path: Path, pg_dsn: str) -> None:
    config = _config(tmp_path, pg_dsn, None)
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    services = pipeline.Services(config)
    try:
        primary = services.keys.create_key(f"p-{uuid.uuid4().hex[:6]}")
        LocalKeyring(tmp_path / "escrow" / "escrow-keyring.json").create_key(RAW)
        tenant = f"kill-{uuid.uuid4().hex[:8]}"
        pipeline.add_tenant(services, tenant, primary)
        ids = [_ingest(services, tmp_path, tenant, i)[0] for i in range(4)]
        args = ("tenants", "set-keys", tenant, "--key", primary, "--escrow-key", f"raw-aes:{RAW}")
        killed = _subprocess_cli(cfg, *args, env={"FSRECRYPT_TEST_ROTATE_CRASH_AT": "escrow:2"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        done = [rid for rid in ids if services.db.escrow_deks(rid)]
        assert len(done) == 2  # the tenant's escrow list was switched before the rows
        assert services.db.tenant_by_name(tenant).escrow_key_ids == (f"raw-aes:{RAW}",)
        again = _subprocess_cli(cfg, *args, env={})
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout)
        assert summary["escrow_rewrapped"] == 2 and summary["remaining"] == 0
        assert all(len(services.db.escrow_deks(rid)) == 1 for rid in ids)
    finally:
        services.close()


def test_an_unusable_escrow_key_does_not_stop_recordings(tmp_path: Path, pg_dsn: str) -> None:
    """Stored with the other keys; the gap is named, found by verify --escrow, filled later."""
    config = _config(tmp_path, pg_dsn, None)
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    services = pipeline.Services(config)
    try:
        primary = services.keys.create_key(f"p-{uuid.uuid4().hex[:6]}")
        ring_path = tmp_path / "escrow" / "escrow-keyring.json"
        LocalKeyring(ring_path).create_key(RAW)
        tenant = f"gap-{uuid.uuid4().hex[:8]}"
        add_tenant_with_escrow(services, tenant, primary, [f"raw-aes:{RAW}"])
        saved = ring_path.read_bytes()
        ring_path.unlink()  # the escrow keyring is gone (unmounted, restored from backup later)
        rid, original = _ingest(services, tmp_path, tenant, 7)
        rec = services.db.recording(rid)
        assert rec.status == "stored"
        assert f"raw-aes:{RAW}" in rec.encryption_metadata["escrow_missing"]
        assert services.db.escrow_deks(rid) == []
        ring_path.write_bytes(saved)
        os.chmod(ring_path, 0o600)
        code, out = _cli(cfg, "verify", "--escrow", "--tenant", tenant)
        assert code != 0 and f"FAIL {rid}" in out and "no escrow copy" in out
        code, out = _cli(cfg, "tenants", "set-keys", tenant, "--key", primary,
                         "--escrow-key", f"raw-aes:{RAW}")  # fmt: skip
        assert code == 0 and json.loads(out)["escrow_rewrapped"] == 1, out
        assert "escrow_missing" not in services.db.recording(rid).encryption_metadata
        code, out = _cli(cfg, "verify", "--escrow", "--tenant", tenant)
        assert code == 0, out
        ring = json.loads((tmp_path / "keyring.json").read_text())
        del ring["keys"][primary]
        (tmp_path / "keyring.json").write_text(json.dumps(ring))
        code, out = _cli(cfg, "get", rid, "-o", str(tmp_path / "gap.wav"))
        assert code == 0, out
        assert (tmp_path / "gap.wav").read_bytes() == original
    finally:
        services.close()


def test_escrow_check_names_a_missing_key(tmp_path: Path) -> None:
    """What the daemon's and `fsrecrypt health`'s key checks call for each escrow key."""
    cfg = _config(tmp_path, "dbname=unused", None)
    escrow = EscrowKeys(cfg.keys)
    LocalKeyring(cfg.keys.escrow_keyring).create_key(RAW)
    escrow.check(f"raw-aes:{RAW}")
    with pytest.raises(KeyNotFound, match="gone"):
        escrow.check("raw-aes:gone")


def test_disaster_recovery_promotes_the_escrow_key_without_the_lost_one(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The primary key is lost: `set-keys --key ESCROW` makes the escrow copies primary."""
    config = _config(tmp_path, pg_dsn, None)
    config = with_overrides(config, keys={"escrow_keyring": ""})  # escrow keys in the keyring
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    services = pipeline.Services(config)
    try:
        lost = services.keys.create_key(f"lost-{uuid.uuid4().hex[:6]}")
        spare = services.keys.create_key(f"spare-{uuid.uuid4().hex[:6]}")
        tenant = f"dr-{uuid.uuid4().hex[:8]}"
        add_tenant_with_escrow(services, tenant, lost, [f"raw-aes:{spare}"])
        originals = dict(_ingest(services, tmp_path, tenant, i) for i in range(3))
        ring = json.loads((tmp_path / "keyring.json").read_text())
        del ring["keys"][lost]
        (tmp_path / "keyring.json").write_text(json.dumps(ring))

        code, out = _cli(cfg, "tenants", "set-keys", tenant, "--key", spare)
        assert code == 0, out
        summary = json.loads(out)
        assert summary["promoted"] == 3 and summary["remaining"] == 0, summary
        assert summary["rotation"]["rewrapped"] == 0  # the lost key was never needed
        for rid, data in originals.items():
            row = services.db.recording(rid)
            assert row.kms_key_id == spare and services.db.escrow_deks(rid) == []
            code, out = _cli(cfg, "get", rid, "-o", str(tmp_path / f"{rid}.dr"))
            assert code == 0, out
            assert (tmp_path / f"{rid}.dr").read_bytes() == data
            audit = services.db.audit_rows(recording_id=rid, action="download")[-1]
            assert audit["details"]["wrapping_key"] == spare
            assert audit["details"]["escrow"] is False  # opened by the primary copy now
        # New recordings are wrapped by the new primary alone.
        rid, _ = _ingest(services, tmp_path, tenant, 9)
        assert services.db.recording(rid).kms_key_id == spare
    finally:
        services.close()


def test_primary_and_escrow_swap_places(tmp_path: Path, pg_dsn: str) -> None:
    config = with_overrides(_config(tmp_path, pg_dsn, None), keys={"escrow_keyring": ""})
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    services = pipeline.Services(config)
    try:
        a = services.keys.create_key(f"a-{uuid.uuid4().hex[:6]}")
        b = services.keys.create_key(f"b-{uuid.uuid4().hex[:6]}")
        tenant = f"swap-{uuid.uuid4().hex[:8]}"
        add_tenant_with_escrow(services, tenant, a, [f"raw-aes:{b}"])
        ids = [_ingest(services, tmp_path, tenant, i)[0] for i in range(2)]
        code, out = _cli(
            cfg, "tenants", "set-keys", tenant, "--key", b, "--escrow-key", f"raw-aes:{a}"
        )
        assert code == 0, out
        summary = json.loads(out)
        assert summary["promoted"] == 2 and summary["escrow_rewrapped"] == 0, summary
        for rid in ids:
            assert services.db.recording(rid).kms_key_id == b
            assert [ref for ref, _ in services.db.escrow_deks(rid)] == [f"raw-aes:{a}"]
        code, out = _cli(cfg, "verify", "--escrow", "--tenant", tenant)
        assert code == 0, out
        assert _cli(cfg, "verify", "--tenant", tenant)[0] == 0
    finally:
        services.close()


def test_an_upload_is_wrapped_by_the_escrow_keys_too(tmp_path: Path, pg_dsn: str) -> None:
    """The API upload starts its encryption where the daemon does: same EDKs, same rows."""
    config = _config(tmp_path, pg_dsn, None)
    services = pipeline.Services(config)
    try:
        primary = services.keys.create_key(f"p-{uuid.uuid4().hex[:6]}")
        LocalKeyring(tmp_path / "escrow" / "escrow-keyring.json").create_key(RAW)
        tenant = f"up-{uuid.uuid4().hex[:8]}"
        add_tenant_with_escrow(services, tenant, primary, (f"raw-aes:{RAW}",))
        data = make_wav(tmp_path / "upload.wav", 1.0, seed=7)
        request = pipeline.UploadRequest(
            tenant_id=services.db.tenant_by_name(tenant).id,
            call_uuid="upload-escrow",
            user_id="alice",
        )
        outcome = pipeline.store_upload(services, request, [data], lease_seconds=60)
        rid = outcome.recording.id
        assert [ref for ref, _ in services.db.escrow_deks(rid)] == [f"raw-aes:{RAW}"]
        message = (tmp_path / "objects" / (services.db.recording(rid).s3_path or "")).read_bytes()
        assert len(parse_header(message).encrypted_data_keys) == 2
        ring = _raw_sdk_provider(tmp_path / "escrow" / "escrow-keyring.json", RAW)
        assert _sdk_decrypt(ring, message) == data
    finally:
        services.close()
