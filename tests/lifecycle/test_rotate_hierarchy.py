"""``rotate`` for a hierarchy tenant moves its branch key to another KMS key, not its recordings.

Proof that only the branch key moved: a handful of KMS calls whatever the
number of recordings, every recording row and object byte-identical
afterwards, a key store that trusts only the old KMS key can no longer read
the branch key while one that trusts only the new key (and the official SDK
with it) can, and a fresh process plays every recording back with KMS
Decrypt calls naming the new key only. Also through the command line:
``keys create-store``, ``tenants add --branch-key new``, ``keys
rotate-branch``, ``keys list`` and ``rotate``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aws_encryption_sdk
import pytest
from aws_cryptographic_material_providers.keystore.models import GetActiveBranchKeyInput
from aws_encryption_sdk.identifiers import CommitmentPolicy

from fsrecrypt import errors
from fsrecrypt.config import with_overrides
from fsrecrypt.lifecycle.rotate import rotate_tenant
from fsrecrypt.pipeline import Services, add_branch_key_tenant, fetch_recording, ingest_file
from tests.support.factories import local_config, make_wav, unique, write_config
from tests.support.keystore import KeyStoreEnv

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _kms_key_ids(client: Any) -> list[str]:
    seen: list[str] = []
    client.meta.events.register(
        "provide-client-params.kms.*",
        lambda params, **_kw: seen.append(str(params.get("KeyId") or params.get("SourceKeyId"))),
    )
    return seen


@pytest.fixture
def config(tmp_path: Path, pg_dsn: str, key_store: KeyStoreEnv):
    return local_config(tmp_path, pg_dsn, keys=key_store.keys_section())


def _ingest(services: Services, tmp_path: Path, tenant: str, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        wav = tmp_path / "recordings" / f"{tenant}-{i}.wav"
        data = make_wav(wav, 0.05, seed=i)
        out.append((ingest_file(services, str(wav), tenant).recording.id, data))
    return out


def _snapshot(services: Services, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    root = Path(services.config.storage.path)
    snap = {}
    for rec_id in ids:
        r = services.db.recording(rec_id)
        snap[rec_id] = (r.encrypted_dek, r.kms_key_id, r.s3_path, (root / r.s3_path).read_bytes())
    return snap


def test_rotate_moves_the_branch_key_not_the_recordings(
    config, key_store: KeyStoreEnv, tmp_path: Path
) -> None:
    services = Services(config)
    acme = add_branch_key_tenant(services, unique("acme"), "new")
    sharer = add_branch_key_tenant(services, unique("sharer"), acme.kms_key_id)
    other = add_branch_key_tenant(services, unique("other"), "new")
    services.keys.version_branch_key(acme.kms_key_id)  # two versions to move
    stored = _ingest(services, tmp_path, acme.name, 30) + _ingest(
        services, tmp_path, sharer.name, 5
    )
    ids = [rec_id for rec_id, _ in stored]
    before = _snapshot(services, ids)
    old_arn, new_arn = key_store.kms_key_arn, key_store.new_kms_key()

    summary = rotate_tenant(services, acme.name, new_arn, user_id="ops")

    assert summary.to_key == new_arn and summary.previous_tenant_key == old_arn
    assert sorted(summary.items_rewrapped)[:2] == ["beacon:ACTIVE", "branch:ACTIVE"]
    assert len(summary.items_rewrapped) == 4  # + two versions
    assert summary.kms_calls <= 6, summary  # 4 ReEncrypt + the proof it works
    assert summary.stored == 30 and not summary.failures and summary.remaining == 0
    assert sorted(summary.tenants_on_branch_key) == sorted([acme.name, sharer.name])
    assert _snapshot(services, ids) == before, "no recording may change"
    assert services.db.branch_key_kms(acme.kms_key_id) == new_arn
    assert services.db.branch_key_kms(other.kms_key_id) is None
    audit = [r for r in services.db.audit_rows(tenant_id=acme.id) if r["action"] == "rotate"]
    assert audit[-1]["success"] and audit[-1]["details"]["step"] == "branch-key-move"

    # The key store itself moved: strict on the old key it refuses, on the new key it reads.
    with pytest.raises(Exception, match="does not match"):
        key_store.official_key_store(old_arn).get_active_branch_key(
            GetActiveBranchKeyInput(branch_key_identifier=acme.kms_key_id)
        )
    root = Path(config.storage.path)
    rec = services.db.recording(ids[0])
    plaintext, _ = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    ).decrypt(
        source=(root / rec.s3_path).read_bytes(),
        keyring=key_store.official_keyring(acme.kms_key_id, new_arn),
    )
    assert plaintext == stored[0][1]

    # A fresh process plays everything back through the new KMS key only.
    fresh = Services(config)
    key_ids = _kms_key_ids(fresh.keys.kms_client)
    try:
        for rec_id, data in stored:
            out = io.BytesIO()
            fetch_recording(fresh, rec_id, out, user_id="listener")
            assert out.getvalue() == data
        assert key_ids and set(key_ids) == {new_arn}
    finally:
        fresh.close()

    # Idempotent: a second run finds every item on the new key.
    again = rotate_tenant(services, acme.name, new_arn, user_id="ops")
    assert again.items_rewrapped == [] and len(again.items_already_current) == 4
    # A moved branch key is versioned under its new KMS key.
    services.keys.version_branch_key(acme.kms_key_id)
    listed = {k.key_id: k.description for k in services.keys.list_keys()}
    assert new_arn in listed[acme.kms_key_id]
    services.close()


def test_a_running_process_follows_the_move_after_its_cache_expires(
    config, key_store: KeyStoreEnv, tmp_path: Path
) -> None:
    short = with_overrides(config, keys={"cache_ttl": 1})
    daemon_like = Services(short)
    tenant = add_branch_key_tenant(daemon_like, unique("acme"), "new")
    (first,) = _ingest(daemon_like, tmp_path, tenant.name, 1)
    admin = Services(short)
    rotate_tenant(admin, tenant.name, key_store.new_kms_key(), user_id="ops")
    admin.close()
    time.sleep(1.5)  # the cached branch key and its KMS key lookup expire
    wav = tmp_path / "recordings" / "after-move.wav"
    data = make_wav(wav, 0.05, seed=42)
    rec_id = ingest_file(daemon_like, str(wav), tenant.name).recording.id
    for rid, expected in ((first[0], first[1]), (rec_id, data)):
        out = io.BytesIO()
        fetch_recording(daemon_like, rid, out, user_id="t")
        assert out.getvalue() == expected
    daemon_like.close()


def test_a_version_first_read_after_a_move_finds_the_new_kms_key(
    config, key_store: KeyStoreEnv, tmp_path: Path
) -> None:
    """The process still believes the old KMS key (its lookup is cached for the TTL) when it
    first needs a branch key version: the key store refuses it, the process asks again."""
    reader = Services(config)
    tenant = add_branch_key_tenant(reader, unique("acme"), "new")
    _ingest(reader, tmp_path, tenant.name, 1)  # the reader now knows "old KMS key"
    writer = Services(config)
    wav = tmp_path / "recordings" / "by-writer.wav"
    data = make_wav(wav, 0.05, seed=7)
    rec_id = ingest_file(writer, str(wav), tenant.name).recording.id
    rotate_tenant(writer, tenant.name, key_store.new_kms_key(), user_id="ops")
    writer.close()
    out = io.BytesIO()
    fetch_recording(reader, rec_id, out, user_id="t")  # version not cached: fetched now
    assert out.getvalue() == data
    reader.close()


def test_a_tenant_still_on_a_kms_key_moves_to_a_branch_key_recording_by_recording(
    config, key_store: KeyStoreEnv, tmp_path: Path
) -> None:
    """Switching the provider keeps old tenants working (KMS directly); rotate --to BRANCH
    then re-wraps each of their data keys once, after which KMS leaves their path too."""
    services = Services(config)
    old_arn = key_store.new_kms_key()
    tenant = services.db.add_tenant(unique("legacy"), old_arn)
    stored = _ingest(services, tmp_path, tenant.name, 6)
    assert services.db.recording(stored[0][0]).kms_key_id == old_arn
    branch = services.keys.create_key("new")
    summary = rotate_tenant(services, tenant.name, branch, user_id="ops")
    assert summary.rewrapped == 6 and not summary.failures
    assert services.db.tenant_by_name(tenant.name).kms_key_id == branch
    fresh = Services(config)
    key_ids = _kms_key_ids(fresh.keys.kms_client)
    direct_ids = _kms_key_ids(fresh.keys.direct.client)
    try:
        for rec_id, data in stored:
            assert fresh.db.recording(rec_id).kms_key_id == branch
            out = io.BytesIO()
            fetch_recording(fresh, rec_id, out, user_id="listener")
            assert out.getvalue() == data
        assert len(key_ids) == 1 and direct_ids == []  # one branch key fetch, no per-recording KMS
    finally:
        fresh.close()
        services.close()


def test_rotate_refuses_a_disabled_or_unknown_target(config, key_store: KeyStoreEnv) -> None:
    services = Services(config)
    tenant = add_branch_key_tenant(services, unique("acme"), "new")
    with pytest.raises(errors.KeyNotFound):
        rotate_tenant(services, tenant.name, "alias/no-such-key", user_id="ops")
    assert services.db.branch_key_kms(tenant.kms_key_id) is None
    fails = [r for r in services.db.audit_rows(tenant_id=tenant.id) if r["action"] == "rotate"]
    assert fails and not fails[-1]["success"]
    services.close()


def test_branch_key_tenants_need_the_hierarchy_provider(tmp_path: Path, pg_dsn: str) -> None:
    services = Services(local_config(tmp_path, pg_dsn))
    with pytest.raises(errors.ConfigError, match="aws-kms-hierarchy"):
        add_branch_key_tenant(services, unique("acme"), "new")
    services.close()


def _cli(*args: str, config: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fsrecrypt.cli", "-c", str(config), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, f"fsrecrypt {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def test_the_command_line_end_to_end(tmp_path: Path, pg_dsn: str, moto_server) -> None:
    kms = moto_server.client("kms")
    arn = kms.create_key()["KeyMetadata"]["Arn"]
    table = unique("fsrecrypt-cli-store")
    keys = {
        "provider": "aws-kms-hierarchy",
        "region": moto_server.region,
        "endpoint_url": moto_server.endpoint_url,
        "key_store_table": table,
        "key_store_kms_key": arn,
    }
    cfg = write_config(tmp_path / "fsrecrypt.toml", local_config(tmp_path, pg_dsn, keys=keys))
    assert _cli("keys", "create-store", config=cfg).strip().endswith(f":table/{table}")
    name = unique("acme")
    added = json.loads(_cli("tenants", "add", name, "--branch-key", "new", config=cfg))
    branch = added["key"]
    assert branch in _cli("keys", "list", config=cfg)
    wav = tmp_path / "recordings" / "cli.wav"
    data = make_wav(wav, 0.1)
    _cli("ingest", str(wav), "--tenant", name, config=cfg)
    rotated = json.loads(_cli("keys", "rotate-branch", "--tenant", name, config=cfg))
    assert rotated["branch_key"] == branch and rotated["kms_key"] == arn
    new_arn = kms.create_key()["KeyMetadata"]["Arn"]
    moved = json.loads(_cli("rotate", "--tenant", name, "--to", new_arn, config=cfg))
    assert moved["to_key"] == new_arn and len(moved["items_rewrapped"]) == 4
    services = Services(local_config(tmp_path, pg_dsn, keys=keys))
    (rec,) = services.db.recordings(source_path=str(wav))
    out = io.BytesIO()
    fetch_recording(services, rec.id, out, user_id="t")
    assert out.getvalue() == data
    services.close()


def test_the_command_line_refuses_what_does_not_fit(tmp_path: Path, pg_dsn: str) -> None:
    local = write_config(tmp_path / "local.toml", local_config(tmp_path, pg_dsn))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fsrecrypt.cli", "-c", str(local), *args],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            cwd=ROOT,
            timeout=120,
        )

    for args, why in (
        (("keys", "create-store"), "aws-kms-hierarchy"),
        (("tenants", "add", unique("t"), "--branch-key", "new"), "aws-kms-hierarchy"),
        (("tenants", "add", unique("t"), "--key", "k", "--branch-key", "new"), "exactly one"),
        (("tenants", "add", unique("t")), "exactly one"),
        (("keys", "rotate-branch", "--tenant", "nobody"), "aws-kms-hierarchy"),
    ):
        proc = run(*args)
        assert proc.returncode != 0 and why in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
