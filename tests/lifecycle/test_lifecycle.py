"""Key rotation, erasure, retention, legal holds and verification, end to end.

Real PostgreSQL (the session database), the local keyring and the local store;
recordings are made by the real pipeline (``ingest_file``) from generated
WAVs, and commands run through the real CLI (CliRunner, or a subprocess when
the test needs to kill it).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
import wave
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from click.testing import CliRunner

from fsrecrypt import db as dbmod
from fsrecrypt.cli import main
from fsrecrypt.config import load_config
from fsrecrypt.errors import NoUsableDataKey, RecordingGone
from fsrecrypt.keys import LocalKeyring
from fsrecrypt.lifecycle.audit import verify_audit_chains
from fsrecrypt.lifecycle.erase import receipt_hash
from fsrecrypt.pipeline import Services, fetch_recording, ingest_file, open_recording

ROOT = Path(__file__).resolve().parents[2]


def make_wav(path: Path, seconds: float, seed: int) -> bytes:
    """A mono 8 kHz 16-bit WAV with deterministic, non-repeating samples."""
    frames = bytes((i * 7 + seed * 13 + (i >> 8)) & 0xFF for i in range(int(16000 * seconds)))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(frames)
    return path.read_bytes()


@dataclass
class World:
    tmp: Path
    dsn: str
    cfg: Path
    services: Services
    tenant: str
    keyring: Path
    store_root: Path
    originals: dict[str, bytes]

    def cli(self, *args: str, input: str | None = None):
        return CliRunner().invoke(
            main, ["-c", str(self.cfg), *args], input=input, catch_exceptions=False
        )

    def subprocess(self, *args: str, env: dict[str, str] | None = None):
        return subprocess.run(
            [sys.executable, "-m", "fsrecrypt.cli", "-c", str(self.cfg), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            timeout=120,
        )

    def ingest(self, n: int, *, call_uuid: str | None = None, seconds: float = 1.3) -> list[str]:
        ids = []
        for _ in range(n):
            seed = len(self.originals)
            wav = self.tmp / "in" / f"rec{seed}.wav"
            wav.parent.mkdir(exist_ok=True)
            data = make_wav(wav, seconds, seed)
            outcome = ingest_file(
                self.services, str(wav), self.tenant, call_uuid=call_uuid, user_id="test"
            )
            assert outcome.plaintext_deleted
            self.originals[outcome.recording.id] = data
            ids.append(outcome.recording.id)
        return ids

    def decrypt_via_db(self, rec_id: str) -> bytes:
        fresh = Services(load_config(self.cfg))
        try:
            out = io.BytesIO()
            fetch_recording(fresh, rec_id, out, user_id="test")
            return out.getvalue()
        finally:
            fresh.close()

    def row(self, rec_id: str) -> dbmod.Recording:
        return self.services.db.recording(rec_id)

    def sql(self, statement: str, params: tuple = ()) -> None:
        conn = psycopg2.connect(self.dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement, params)
        finally:
            conn.close()

    def drop_key(self, key_id: str) -> None:
        doc = json.loads(self.keyring.read_text())
        del doc["keys"][key_id]
        self.keyring.write_text(json.dumps(doc))
        os.chmod(self.keyring, 0o600)

    def objects(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.store_root))
            for p in self.store_root.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )


def write_config(tmp: Path, dsn: str, retention_days: int = 0, extra: str = "") -> Path:
    cfg = tmp / "fsrecrypt.toml"
    cfg.write_text(
        f'[database]\ndsn = "{dsn}"\n'
        f'[keys]\nkeyring = "{tmp / "keyring.json"}"\n'
        f'[storage]\npath = "{tmp / "objects"}"\nprefix = "recordings/"\n'
        "[pipeline]\nframe_size = 4096\n"
        f"[retention]\ndays = {retention_days}\n{extra}"
    )
    return cfg


@pytest.fixture
def world(tmp_path: Path, pg_dsn: str) -> World:
    cfg = write_config(tmp_path, pg_dsn)
    (tmp_path / "objects").mkdir()
    keyring = LocalKeyring(tmp_path / "keyring.json")
    keyring.create_key("old")
    keyring.create_key("new")
    services = Services(load_config(cfg))
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    services.db.add_tenant(tenant, "old")
    w = World(tmp_path, pg_dsn, cfg, services, tenant, keyring.path, tmp_path / "objects", {})
    yield w
    services.close()


def _json_out(result) -> object:
    return json.loads(result.stdout)


# --- rotation -----------------------------------------------------------------------------


def test_rotation_rewraps_every_key_and_everything_still_decrypts(world: World) -> None:
    ids = world.ingest(3)
    before = {i: world.row(i) for i in ids}
    run = world.cli("rotate", "--tenant", world.tenant, "--to", "new", "--user", "ops")
    assert run.exit_code == 0, run.output
    summary = _json_out(run)
    assert summary["rewrapped"] == 3 and summary["failures"] == {} and summary["remaining"] == 0
    assert world.services.db.tenant_by_name(world.tenant).kms_key_id == "new"
    for i in ids:
        row = world.row(i)
        assert row.kms_key_id == "new"
        assert row.encrypted_dek != before[i].encrypted_dek
        assert row.s3_path == before[i].s3_path  # audio untouched without --rewrite-headers
        assert world.decrypt_via_db(i) == world.originals[i]
    logged = world.services.db.audit_rows(
        tenant_id=world.services.db.tenant_by_name(world.tenant).id, action="rotate"
    )
    assert {r["recording_id"] for r in logged if r["recording_id"]} == set(ids)
    assert logged[-1]["recording_id"] is None and logged[-1]["success"] is True
    assert all(r["user_id"] == "ops" for r in logged)
    # Idempotent: a second run has nothing to do.
    again = _json_out(world.cli("rotate", "--tenant", world.tenant, "--to", "new"))
    assert again["rewrapped"] == 0 and again["remaining"] == 0
    # New recordings use the new key at once.
    (new_id,) = world.ingest(1)
    assert world.row(new_id).kms_key_id == "new"


def test_without_rewrite_headers_the_object_alone_still_needs_the_old_key(world: World) -> None:
    (rec_id,) = world.ingest(1)
    assert world.cli("rotate", "--tenant", world.tenant, "--to", "new").exit_code == 0
    world.drop_key("old")
    # The database copy is enough for reads...
    assert world.decrypt_via_db(rec_id) == world.originals[rec_id]
    # ...but the object's header alone cannot be opened without the old key.
    raw = world.store_root / world.row(rec_id).s3_path
    run = world.cli("decrypt", str(raw), str(world.tmp / "out.wav"))
    assert run.exit_code == 1
    assert "holds none of the wrapping keys 'old'" in run.stderr
    assert not (world.tmp / "out.wav").exists()


def test_rewrite_headers_lets_the_old_key_be_retired(world: World) -> None:
    ids = world.ingest(2)
    old_paths = {i: world.row(i).s3_path for i in ids}
    run = world.cli("rotate", "--tenant", world.tenant, "--to", "new", "--rewrite-headers")
    assert run.exit_code == 0, run.output
    summary = _json_out(run)
    assert summary["headers_rewritten"] == 2 and summary["rewrapped"] == 2
    world.drop_key("old")
    assert world.objects() == sorted(world.row(i).s3_path for i in ids)  # old objects gone
    for i in ids:
        row = world.row(i)
        assert row.s3_path != old_paths[i]
        assert row.encrypted_size_bytes == (world.store_root / row.s3_path).stat().st_size
        assert "rotation_superseded_object" not in row.encryption_metadata
        assert world.decrypt_via_db(i) == world.originals[i]
        out = world.tmp / f"{i}.wav"
        plain = world.cli("decrypt", str(world.store_root / row.s3_path), str(out))
        assert plain.exit_code == 0, plain.output
        assert out.read_bytes() == world.originals[i]
    # Idempotent: nothing left to rewrite.
    again = _json_out(
        world.cli("rotate", "--tenant", world.tenant, "--to", "new", "--rewrite-headers")
    )
    assert again["headers_rewritten"] == 0 and again["rewrapped"] == 0
    assert verify_audit_chains(world.services).ok


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash_at", "rewrite"),
    [("rewrapped:2", False), ("uploaded:2", True), ("swapped:1", True), ("rewrapped:3", True)],
)
def test_rotation_killed_midway_resumes(world: World, crash_at: str, rewrite: bool) -> None:
    ids = world.ingest(4)
    args = ["rotate", "--tenant", world.tenant, "--to", "new"] + (
        ["--rewrite-headers"] if rewrite else []
    )
    killed = world.subprocess(*args, env={"FSRECRYPT_TEST_ROTATE_CRASH_AT": crash_at})
    assert killed.returncode == -9, killed.stderr
    on_new = [i for i in ids if world.row(i).kms_key_id == "new"]
    assert 1 <= len(on_new) < 4 or rewrite  # stopped part way
    # Reads keep working in the half-rotated state.
    for i in ids:
        assert world.decrypt_via_db(i) == world.originals[i]
    resumed = world.subprocess(*args)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["remaining"] == 0 and summary["failures"] == {}
    for i in ids:
        assert world.row(i).kms_key_id == "new"
        assert world.decrypt_via_db(i) == world.originals[i]
    if rewrite:
        # No copy left behind: exactly one object per recording, each openable
        # from its header alone once the old key is gone.
        assert world.objects() == sorted(world.row(i).s3_path for i in ids)
        world.drop_key("old")
        for i in ids:
            out = world.tmp / f"{i}.wav"
            run = world.cli("decrypt", str(world.store_root / world.row(i).s3_path), str(out))
            assert run.exit_code == 0, run.output
            assert out.read_bytes() == world.originals[i]


def test_rotation_to_a_missing_key_changes_nothing(world: World) -> None:
    (rec_id,) = world.ingest(1)
    run = world.cli("rotate", "--tenant", world.tenant, "--to", "nope")
    assert run.exit_code == 1 and "'nope' is not in keyring" in run.stderr
    assert world.services.db.tenant_by_name(world.tenant).kms_key_id == "old"
    assert world.row(rec_id).kms_key_id == "old"
    tenant_id = world.services.db.tenant_by_name(world.tenant).id
    failed = world.services.db.audit_rows(tenant_id=tenant_id, action="rotate")
    assert failed and failed[-1]["success"] is False


# --- erasure, retention, holds --------------------------------------------------------------


def test_erase_crypto_shreds_and_keeps_the_audit_rows(world: World) -> None:
    keep, victim = world.ingest(2)
    path = world.row(victim).s3_path
    refused = world.cli("erase", "--recording", victim, "--reason", "gdpr-1", input="n\n")
    assert refused.exit_code == 1 and world.row(victim).status == "stored"  # not confirmed
    run = world.cli(
        "erase",
        "--recording",
        victim,
        "--reason",
        "GDPR #42",
        "--yes",
        "--override-retention",
        "--user",
        "dpo",
    )
    assert run.exit_code == 0, run.output
    receipt = _json_out(run)
    assert receipt["recording_ids"] == [victim] and receipt["object_keys"] == [path]
    assert receipt["versions_deleted"] == 1 and receipt["operator"] == "dpo"
    assert receipt["reason"] == "GDPR #42" and receipt["receipt_hash"] == receipt_hash(receipt)
    row = world.row(victim)
    assert row.status == "erased" and row.encrypted_dek is None and row.erased_at is not None
    assert not (world.store_root / path).exists()
    with pytest.raises(RecordingGone):
        open_recording(world.services, row)
    got = world.cli("get", victim, "-o", str(world.tmp / "x.wav"))
    assert got.exit_code == 1 and "erased" in got.stderr
    actions = [r["action"] for r in world.services.db.audit_rows(recording_id=victim)]
    assert actions[0] == "encrypt" and "erase" in actions
    erase_row = world.services.db.audit_rows(recording_id=victim, action="erase")[0]
    assert erase_row["details"]["override_retention"] is True
    assert erase_row["details"]["receipt_id"] == receipt["receipt_id"]
    assert world.decrypt_via_db(keep) == world.originals[keep]
    # Erasing again is harmless.
    again = world.cli("erase", "--recording", victim, "--reason", "again", "--yes")
    assert again.exit_code == 0 and _json_out(again)["recording_ids"] == []
    held = world.cli("hold", "add", "--recording", victim, "--reason", "too late")
    assert held.exit_code == 1 and "nothing left to hold" in held.stderr


def test_retention_blocks_erasure_without_override(world: World) -> None:
    world.cfg = write_config(world.tmp, world.dsn, retention_days=30)
    (rec_id,) = world.ingest(1)
    run = world.cli("erase", "--recording", rec_id, "--reason", "cleanup", "--yes")
    assert run.exit_code == 1
    assert "inside the retention period of 30 days" in run.stderr and "--override-retention" in (
        run.stderr
    )
    assert world.row(rec_id).status == "stored"
    world.sql(
        "UPDATE call_recordings SET created_at = now() - interval '31 days' WHERE id = %s",
        (rec_id,),
    )
    run = world.cli("erase", "--recording", rec_id, "--reason", "cleanup", "--yes")
    assert run.exit_code == 0, run.output
    assert world.row(rec_id).status == "erased"


def test_keep_forever_needs_override(world: World) -> None:
    (rec_id,) = world.ingest(1)
    world.sql(
        "UPDATE call_recordings SET created_at = now() - interval '20 years' WHERE id = %s",
        (rec_id,),
    )
    run = world.cli("erase", "--recording", rec_id, "--reason", "x", "--yes")
    assert run.exit_code == 1 and "forever" in run.stderr


def test_legal_hold_blocks_erase_and_expire(world: World) -> None:
    world.cfg = write_config(world.tmp, world.dsn, retention_days=10)
    call = str(uuid.uuid4())
    held_a, held_b = world.ingest(2, call_uuid=call)
    old_free, fresh = world.ingest(2)
    world.sql(
        "UPDATE call_recordings SET created_at = now() - interval '11 days'"
        " WHERE id = ANY(%s::uuid[])",
        ([held_a, held_b, old_free],),
    )
    add = world.cli("hold", "add", "--call", call, "--reason", "case 7", "--user", "counsel")
    assert add.exit_code == 0, add.output
    assert {r["status"] for r in _json_out(add)} == {"held"}
    again = _json_out(world.cli("hold", "add", "--recording", held_a, "--reason", "case 8"))
    assert again == [{"recording_id": held_a, "status": "already held"}]
    listed = world.cli("hold", "list")
    assert held_a in listed.stdout and held_b in listed.stdout and "case 7" in listed.stdout

    run = world.cli(
        "erase", "--recording", held_a, "--reason", "x", "--yes", "--override-retention"
    )
    assert run.exit_code == 1 and "legal hold" in run.stderr and held_a in run.stderr
    run = world.cli(
        "erase", "--tenant", world.tenant, "--reason", "x", "--yes", "--override-retention"
    )
    assert run.exit_code == 1 and "legal hold" in run.stderr
    assert all(world.row(i).status == "stored" for i in (held_a, held_b, old_free, fresh))

    dry = _json_out(world.cli("expire", "--dry-run"))
    assert old_free in dry["expired"] and held_a in dry["held"] and fresh not in dry["expired"]
    assert world.row(old_free).status == "stored"
    run = world.cli("expire", "--yes", "--user", "cron")
    assert run.exit_code == 0, run.output
    report = _json_out(run)
    assert old_free in report["receipt"]["recording_ids"]
    assert held_a not in report["receipt"]["recording_ids"]
    assert world.row(old_free).status == "erased"
    assert (
        world.row(held_a).status
        == world.row(held_b).status
        == world.row(fresh).status
        == ("stored")
    )
    expire_rows = world.services.db.audit_rows(recording_id=old_free, action="expire")
    assert expire_rows and expire_rows[0]["user_id"] == "cron"

    removed = world.cli("hold", "remove", "--recording", held_a, "--reason", "case closed")
    assert removed.exit_code == 0 and _json_out(removed)[0]["status"] == "released"
    assert held_a not in world.cli("hold", "list").stdout
    run = world.cli("expire", "--yes")
    assert held_a in _json_out(run)["receipt"]["recording_ids"]
    assert world.row(held_a).status == "erased" and world.row(held_b).status == "stored"
    tenant_id = world.services.db.tenant_by_name(world.tenant).id
    actions = {r["action"] for r in world.services.db.audit_rows(tenant_id=tenant_id)}
    assert {"hold_add", "hold_remove", "expire"} <= actions
    not_held = world.cli("hold", "remove", "--recording", fresh, "--reason", "x")
    assert not_held.exit_code == 1 and "no active legal hold" in not_held.stderr


# --- verification -------------------------------------------------------------------------


def test_verify_passes_intact_and_names_damaged_recordings(world: World) -> None:
    good, flipped, missing, resized = world.ingest(4, seconds=2.0)
    run = world.cli("verify", "--tenant", world.tenant)
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.splitlines()[-1])["ok"] == 4

    target = world.store_root / world.row(flipped).s3_path
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    (world.store_root / world.row(missing).s3_path).unlink()
    world.sql(
        "UPDATE call_recordings SET encrypted_size_bytes = encrypted_size_bytes + 1 WHERE id = %s",
        (resized,),
    )
    run = world.cli("verify", "--tenant", world.tenant)
    assert run.exit_code == 1
    lines = {line.split(":", 1)[0]: line for line in run.stdout.splitlines()}
    assert f"FAIL {flipped}" in lines and "frames:" in lines[f"FAIL {flipped}"]
    assert f"FAIL {missing}" in lines and "object:" in lines[f"FAIL {missing}"]
    assert f"FAIL {resized}" in lines and "size:" in lines[f"FAIL {resized}"]
    assert f"FAIL {good}" not in lines
    summary = json.loads(run.stdout.splitlines()[-1])
    assert summary["checked"] == 4 and summary["failed"] == 3
    assert "3 of 4 recording(s) failed verification" in run.stderr

    sampled = world.cli("verify", "--tenant", world.tenant, "--sample", "25")
    assert json.loads(sampled.stdout.splitlines()[-1])["checked"] == 1


def test_verify_names_a_key_that_is_gone(world: World) -> None:
    (rec_id,) = world.ingest(1)
    world.drop_key("old")
    run = world.cli("verify", "--tenant", world.tenant)
    assert run.exit_code == 1
    assert f"FAIL {rec_id}: key:" in run.stdout


def test_header_only_decrypt_error_is_typed(world: World) -> None:
    """Guard for the test above: the refusal is the typed NoUsableDataKey."""
    (rec_id,) = world.ingest(1)
    world.drop_key("old")
    with pytest.raises(NoUsableDataKey):
        open_recording(world.services, world.row(rec_id))


@pytest.mark.slow
def test_rotation_while_recordings_keep_arriving(world: World) -> None:
    """Rotation runs beside a storing 'daemon': nothing is lost, a rerun mops up stragglers."""
    import threading

    first = world.ingest(4)
    errors: list[BaseException] = []
    arrived: list[str] = []

    def keep_storing() -> None:
        try:
            for _ in range(6):
                arrived.extend(world.ingest(1))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    storer = threading.Thread(target=keep_storing)
    storer.start()
    run = world.subprocess("rotate", "--tenant", world.tenant, "--to", "new")
    storer.join(timeout=120)
    assert not errors, errors
    assert run.returncode == 0, run.stderr
    final = world.subprocess("rotate", "--tenant", world.tenant, "--to", "new")
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["remaining"] == 0
    for rec_id in first + arrived:
        assert world.row(rec_id).kms_key_id == "new"
        assert world.decrypt_via_db(rec_id) == world.originals[rec_id]


@pytest.mark.slow
def test_erasure_after_a_killed_header_rewrite_leaves_no_copy(world: World) -> None:
    """A copy uploaded by a rotation that died before switching the row is erased too."""
    (rec_id,) = world.ingest(1)
    killed = world.subprocess(
        "rotate",
        "--tenant",
        world.tenant,
        "--to",
        "new",
        "--rewrite-headers",
        env={"FSRECRYPT_TEST_ROTATE_CRASH_AT": "uploaded:1"},
    )
    assert killed.returncode == -9, killed.stderr
    pending = world.row(rec_id).encryption_metadata["rotation_pending_object"]
    assert sorted(world.objects()) == sorted([world.row(rec_id).s3_path, pending])
    run = world.cli(
        "erase", "--recording", rec_id, "--reason", "gdpr", "--yes", "--override-retention"
    )
    assert run.exit_code == 0, run.output
    assert pending in _json_out(run)["object_keys"]
    assert world.objects() == []
