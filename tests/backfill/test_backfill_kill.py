"""``fsrecrypt backfill`` SIGKILLed at random moments, then run again until it finishes.

After every kill the invariant must hold: no source is gone without a
stored row for it. At the end: every file (every distinct S3 content) is
stored exactly once, readable by the official AWS Encryption SDK, no source
or plaintext version is left, and the store holds no object without a row
(an upload killed before its row was written is cleaned up on resume).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fsrecrypt.lifecycle.audit import verify_audit_chains
from tests.backfill.conftest import sdk_decrypt_local
from tests.support.factories import make_wav, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
KILLS = 6


def _command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fsrecrypt", "-c", str(config), "backfill", *args]


def _kill_repeatedly(cmd: list[str], env: dict[str, str], check) -> list[int]:
    """Start, SIGKILL at a random moment, check the invariant; then one run to the end.

    Returns what ``check`` counted after each kill (stored so far).
    """
    rng = random.Random(os.environ.get("PYTEST_SEED", "8"))
    progress = [check()]
    for round_ in range(KILLS):
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if round_ == 0:  # early: while starting up or listing
            time.sleep(rng.uniform(0.05, 0.4))
        else:  # once this run has stored something, at a random instant soon after
            # (soon: on a quiet machine a run stores the whole archive in well
            # under a second, and a kill after the end proves nothing)
            deadline = time.monotonic() + 120
            while check() <= progress[-1] and proc.poll() is None:
                assert time.monotonic() < deadline, "the backfill made no progress"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        progress.append(check())
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check()
    return progress[1:]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def test_directory_backfill_survives_sigkills(local_services, tmp_path) -> None:
    services, tenant, archive = local_services
    files = {}
    for i in range(100):
        sub = archive / f"day{i % 4}"
        sub.mkdir(exist_ok=True)
        path = sub / f"{uuid.uuid4()}.wav"
        files[str(path)] = make_wav(path, 1.0, seed=i)
    config = write_config(tmp_path / "fsrecrypt.toml", services.config)

    def check() -> int:
        # Sources gone first, rows after: a row is stored before its source goes.
        gone = [path for path in files if not os.path.exists(path)]
        stored = {r.source_path: r for r in services.db.recordings(tenant_id=tenant.id)}
        for path in gone:
            assert path in stored and stored[path].status == "stored", path
        return sum(1 for r in stored.values() if r.status == "stored")

    cmd = _command(config, str(archive), "--tenant", tenant.name)
    progress = _kill_repeatedly(cmd, _env(), check)
    print("stored after each kill:", progress)
    assert any(0 < n < len(files) for n in progress), progress  # killed mid-run

    rows = services.db.recordings(tenant_id=tenant.id)
    assert sorted(r.source_path for r in rows) == sorted(files)  # once each
    for rec in rows:
        assert rec.status == "stored"
        blob = services.store.read_bytes(rec.s3_path)
        assert sdk_decrypt_local(services, blob, tenant.kms_key_id)[0] == files[rec.source_path]
    assert [p for p in archive.rglob("*") if p.is_file()] == []
    assert sorted(services.store.list_keys("")) == sorted(r.s3_path for r in rows)
    # Concurrent items and kills mid-transaction leave every audit chain intact.
    assert verify_audit_chains(services).ok


def test_versioned_s3_backfill_survives_sigkills(
    local_services, versioned_s3_bucket, tmp_path
) -> None:
    services, tenant, _archive = local_services
    b = versioned_s3_bucket
    contents = set()
    for i in range(40):
        key = f"rec/{uuid.uuid4()}.wav"
        for version in range(1 + (i % 3 == 0)):
            body = make_wav(tmp_path / "w.wav", 1.0, seed=100 * version + i)
            b.client.put_object(Bucket=b.name, Key=key, Body=body)
            contents.add((f"s3://{b.name}/{key}", body))
    config = write_config(tmp_path / "fsrecrypt.toml", services.config)

    def versions() -> set[str]:
        found = set()
        for page in b.client.get_paginator("list_object_versions").paginate(Bucket=b.name):
            found |= {f"s3://{b.name}/{v['Key']}" for v in page.get("Versions", [])}
        return found

    def check() -> int:
        # Versions first, rows after: a row is stored before its source versions go.
        left = versions()
        stored = {
            r.source_path
            for r in services.db.recordings(tenant_id=tenant.id)
            if r.status == "stored"
        }
        for source, _body in contents:
            if source not in left:
                assert source in stored, source
        return len(stored)

    cmd = _command(
        config,
        f"s3://{b.name}/rec/",
        "--tenant",
        tenant.name,
        "--source-endpoint-url",
        b.endpoint_url,
        "--source-region",
        b.region,
    )
    progress = _kill_repeatedly(cmd, _env(), check)
    print("stored after each kill:", progress)
    assert any(0 < n < len(contents) for n in progress), progress  # killed mid-run

    rows = services.db.recordings(tenant_id=tenant.id)
    got = set()
    for rec in rows:
        assert rec.status == "stored"
        blob = services.store.read_bytes(rec.s3_path)
        got.add((rec.source_path, sdk_decrypt_local(services, blob, tenant.kms_key_id)[0]))
    assert len(rows) == len(contents) and got == contents
    assert versions() == set()
    assert sorted(services.store.list_keys("")) == sorted(r.s3_path for r in rows)
