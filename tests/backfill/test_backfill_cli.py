"""``fsrecrypt backfill`` as an operator runs it: dry run, refusals, failures and the exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.factories import make_wav, write_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fsrecrypt", "-c", str(config), "backfill", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_dry_run_lists_and_changes_nothing(local_services, tmp_path) -> None:
    services, tenant, archive = local_services
    wav = archive / f"{uuid.uuid4()}.wav"
    make_wav(wav, 0.2)
    (archive / "doc.pdf").write_bytes(b"%PDF-1.4")
    cfg = write_config(tmp_path / "fsrecrypt.toml", services.config)
    jobs_before = len(services.db.jobs(limit=1000))

    out = _cli(cfg, str(archive), "--tenant", tenant.name, "--dry-run")

    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    items = [json.loads(line) for line in lines if line.startswith('{"')]
    assert sorted(i["status"] for i in items) == ["skipped", "would-store"]
    summary = json.loads("\n".join(lines[len(items) :]))
    assert summary["counts"] == {"would-store": 1, "skipped": 1} and summary["dry_run"]
    assert wav.exists() and services.db.recordings(tenant_id=tenant.id) == []
    assert len(services.db.jobs(limit=1000)) == jobs_before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tenant", "x", "--tenant-from", "(?P<tenant>.)"], "exactly one of --tenant"),
        (["--tenant-from", "([a-z]+)/"], "no (?P<tenant>...) group"),
        (["--tenant", "nobody-here"], "nobody-here"),
        (["--tenant", "x", "--dry-run", "--detach"], "do not go together"),
        (["--tenant", "x", "--call-uuid-from", "(unclosed"], "not a valid regular expression"),
    ],
)
def test_refused_before_any_job_exists(local_services, tmp_path, args, needle) -> None:
    services, _tenant, archive = local_services
    cfg = write_config(tmp_path / "fsrecrypt.toml", services.config)
    jobs_before = len(services.db.jobs(limit=1000))
    out = _cli(cfg, str(archive), *args)
    assert out.returncode != 0 and needle in out.stderr, out.stderr
    assert len(services.db.jobs(limit=1000)) == jobs_before


def test_missing_source_directory_is_refused(local_services, tmp_path) -> None:
    services, tenant, _archive = local_services
    cfg = write_config(tmp_path / "fsrecrypt.toml", services.config)
    out = _cli(cfg, str(tmp_path / "nope"), "--tenant", tenant.name)
    assert out.returncode == 2 and "is not a directory" in out.stderr


def test_failed_items_make_the_command_fail_and_keep_their_sources(
    local_services, tmp_path
) -> None:
    """The tenant's key is gone from the keyring: nothing can be stored, nothing is removed."""
    services, tenant, archive = local_services
    wav = archive / f"{uuid.uuid4()}.wav"
    data = make_wav(wav, 0.2)
    ring_path = Path(services.config.keys.keyring)
    ring = json.loads(ring_path.read_text())
    del ring["keys"][tenant.kms_key_id]
    ring_path.write_text(json.dumps(ring))
    cfg = write_config(tmp_path / "fsrecrypt.toml", services.config)

    out = _cli(cfg, str(archive), "--tenant", tenant.name)

    assert out.returncode == 1, out.stderr
    assert "failed item" in out.stderr and "jobs retry" in out.stderr
    summary = json.loads(out.stdout)
    assert summary["counts"] == {"failed": 1}
    assert summary["failed"][0]["source"] == str(wav)
    assert wav.read_bytes() == data


def test_keep_source_from_the_command_line(local_services, tmp_path) -> None:
    services, tenant, archive = local_services
    wav = archive / f"{uuid.uuid4()}.wav"
    data = make_wav(wav, 0.2)
    cfg = write_config(tmp_path / "fsrecrypt.toml", services.config)
    out = _cli(cfg, str(archive), "--tenant", tenant.name, "--keep-source")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["counts"] == {"stored": 1}
    assert wav.read_bytes() == data
