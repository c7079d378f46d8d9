"""Retention enforced by the storage: S3 Object Lock on recordings, on moto.

Each test makes a bucket created with Object Lock enabled, stores real
recordings through the pipeline (``ingest_file``), and checks what the
storage itself refuses (a direct DeleteObject of a retained version) and
what ``erase`` and ``hold`` do in each mode.
"""

from __future__ import annotations

import uuid
import wave
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.config import load_config
from fsrecrypt.errors import ConfigError
from fsrecrypt.keys import LocalKeyring
from fsrecrypt.pipeline import Services, ingest_file


def _wav(path: Path, seed: int) -> None:
    frames = bytes((i * 7 + seed * 13) & 0xFF for i in range(12000))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(frames)


class LockedWorld:
    def __init__(self, tmp: Path, dsn: str, moto_server, mode: str, bypass: bool = False):
        self.s3 = moto_server.client("s3")
        self.bucket = f"fsrecrypt-lock-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=self.bucket, ObjectLockEnabledForBucket=True)
        self.cfg = tmp / "fsrecrypt.toml"
        self.cfg.write_text(
            f'[database]\ndsn = "{dsn}"\n'
            f'[keys]\nkeyring = "{tmp / "keyring.json"}"\n'
            f'[storage]\nbackend = "s3"\nbucket = "{self.bucket}"\n'
            f'endpoint_url = "{moto_server.endpoint_url}"\nobject_lock = "{mode}"\n'
            f"governance_bypass = {'true' if bypass else 'false'}\n"
            "[pipeline]\nframe_size = 4096\n[retention]\ndays = 30\n"
        )
        LocalKeyring(tmp / "keyring.json").create_key("k1")
        self.services = Services(load_config(self.cfg))
        self.tenant = f"t-{uuid.uuid4().hex[:10]}"
        self.services.db.add_tenant(self.tenant, "k1")
        self.tmp = tmp

    def ingest(self) -> str:
        wav = self.tmp / f"in-{uuid.uuid4().hex[:6]}.wav"
        _wav(wav, len(str(wav)))
        return ingest_file(self.services, str(wav), self.tenant, user_id="test").recording.id

    def key(self, rec_id: str) -> str:
        return str(self.services.db.recording(rec_id).s3_path)

    def versions(self, key: str) -> list[str]:
        found = self.s3.list_object_versions(Bucket=self.bucket, Prefix=key).get("Versions", [])
        return [v["VersionId"] for v in found if v["Key"] == key]

    def cli(self, *args: str):
        return CliRunner().invoke(main, ["-c", str(self.cfg), *args])


@pytest.fixture
def make_world(tmp_path: Path, pg_dsn: str, moto_server):
    made: list[LockedWorld] = []

    def make(mode: str, bypass: bool = False) -> LockedWorld:
        world = LockedWorld(tmp_path, pg_dsn, moto_server, mode, bypass)
        made.append(world)
        return world

    yield make
    for world in made:
        world.services.close()


def test_objects_carry_retention_and_a_direct_delete_of_the_version_fails(make_world) -> None:
    world = make_world("compliance")
    rec_id = world.ingest()
    key = world.key(rec_id)
    (version,) = world.versions(key)
    head = world.s3.head_object(Bucket=world.bucket, Key=key, VersionId=version)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    created = world.services.db.recording(rec_id).created_at
    until = head["ObjectLockRetainUntilDate"]
    assert (
        created + timedelta(days=30) <= until <= datetime.now(UTC) + timedelta(days=30, minutes=1)
    )
    with pytest.raises(ClientError) as denied:
        world.s3.delete_object(Bucket=world.bucket, Key=key, VersionId=version)
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError):
        world.s3.delete_object(
            Bucket=world.bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
        )
    assert world.versions(key) == [version]


def test_compliance_erase_inside_retention_says_why_it_cannot(make_world) -> None:
    world = make_world("compliance")
    rec_id = world.ingest()
    run = world.cli(
        "erase", "--recording", rec_id, "--reason", "gdpr", "--yes", "--override-retention"
    )
    assert run.exit_code != 0
    assert "compliance retention until" in run.output
    assert "nobody, not even the bucket's root account" in run.output
    row = world.services.db.recording(rec_id)
    assert row.status == "stored" and row.encrypted_dek  # nothing destroyed
    assert world.versions(world.key(rec_id))


def test_governance_erase_needs_the_bypass_setting(make_world) -> None:
    world = make_world("governance")
    rec_id = world.ingest()
    (version,) = world.versions(world.key(rec_id))
    with pytest.raises(ClientError):  # the storage refuses a plain delete
        world.s3.delete_object(Bucket=world.bucket, Key=world.key(rec_id), VersionId=version)
    plain = world.cli("erase", "--recording", rec_id, "--reason", "gdpr", "--yes")
    assert plain.exit_code != 0 and "retention period of 30 days" in plain.output
    run = world.cli(
        "erase", "--recording", rec_id, "--reason", "gdpr", "--yes", "--override-retention"
    )
    assert run.exit_code != 0 and "governance_bypass is false" in run.output
    assert world.services.db.recording(rec_id).status == "stored"


def test_governance_erase_with_bypass_deletes_every_version(make_world) -> None:
    world = make_world("governance", bypass=True)
    rec_id = world.ingest()
    key = world.key(rec_id)
    run = world.cli(
        "erase", "--recording", rec_id, "--reason", "gdpr", "--yes", "--override-retention"
    )
    assert run.exit_code == 0, run.output
    assert world.services.db.recording(rec_id).status == "erased"
    assert world.versions(key) == []


def test_hold_add_and_remove_map_to_s3_legal_holds(make_world) -> None:
    world = make_world("governance", bypass=True)
    rec_id = world.ingest()
    key = world.key(rec_id)
    (version,) = world.versions(key)
    run = world.cli("hold", "add", "--recording", rec_id, "--reason", "case-7")
    assert run.exit_code == 0, run.output
    assert "storage_legal_hold" in run.output
    hold = world.s3.get_object_legal_hold(Bucket=world.bucket, Key=key, VersionId=version)
    assert hold["LegalHold"]["Status"] == "ON"
    # Even a governance-bypass principal cannot delete a version on legal hold.
    with pytest.raises(ClientError):
        world.s3.delete_object(
            Bucket=world.bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
        )
    run = world.cli("hold", "remove", "--recording", rec_id, "--reason", "closed")
    assert run.exit_code == 0, run.output
    hold = world.s3.get_object_legal_hold(Bucket=world.bucket, Key=key, VersionId=version)
    assert hold["LegalHold"]["Status"] == "OFF"


def test_a_leftover_s3_legal_hold_blocks_erase_with_a_clear_message(make_world) -> None:
    world = make_world("governance", bypass=True)
    rec_id = world.ingest()
    key = world.key(rec_id)
    (version,) = world.versions(key)
    world.s3.put_object_legal_hold(
        Bucket=world.bucket, Key=key, VersionId=version, LegalHold={"Status": "ON"}
    )
    run = world.cli(
        "erase", "--recording", rec_id, "--reason", "gdpr", "--yes", "--override-retention"
    )
    assert run.exit_code != 0 and "S3 Object Lock legal hold" in run.output
    assert world.services.db.recording(rec_id).status == "stored"


def test_object_lock_needs_the_s3_backend(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[storage]\nobject_lock = "compliance"\n')
    with pytest.raises(ConfigError, match="needs backend = 's3'"):
        load_config(cfg)
    cfg.write_text('[storage]\nbackend = "s3"\nbucket = "b"\nobject_lock = "Compliance\\u0000"\n')
    with pytest.raises(ConfigError, match="object_lock must be"):
        load_config(cfg)
