"""The one-shot CLI, run as a real subprocess, the way an operator runs it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.factories import local_config, make_wav, s3_config, unique, write_config

ROOT = Path(__file__).resolve().parents[1]


def fsrecrypt(
    *args: str, config: Path | None = None, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fsrecrypt.cli"]
    if config is not None:
        cmd += ["-c", str(config)]
    proc = subprocess.run(
        cmd + list(args),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fsrecrypt {' '.join(args)} failed: {proc.stderr}")
    return proc


@pytest.fixture
def cfg(tmp_path: Path, pg_dsn: str) -> Path:
    return write_config(tmp_path / "fsrecrypt.toml", local_config(tmp_path, pg_dsn))


# What the light paths must not load: the heavy libraries, and the modules of
# ours that import them at their top (fsrecrypt.db and so the pipeline import
# psycopg2; s3.py and kms.py import boto3).
LIGHT_PATH_FORBIDDEN = (
    "boto3",
    "botocore",
    "s3transfer",
    "psycopg2",
    "psycogreen",
    "gevent",
    "greenswitch",
    "flask",
    "werkzeug",
    "fsrecrypt.db",
    "fsrecrypt.pipeline",
    "fsrecrypt.store.s3",
    "fsrecrypt.keys.kms",
    "fsrecrypt.keys.hierarchy",
    "aws_cryptographic_material_providers",
)


def test_help_and_local_encrypt_import_no_boto3_or_psycopg2(tmp_path: Path, cfg: Path) -> None:
    """--help, keys create, encrypt and decrypt with the local keyring stay light."""
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['fsrecrypt'] + sys.argv[1:]\n"
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('fsrecrypt.cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"heavy = sorted(m for m in {LIGHT_PATH_FORBIDDEN!r} if m in sys.modules)\n"
        "print(f'CODE={code}', file=sys.stderr)\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    )
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(10000))
    enc, dec = tmp_path / "o", tmp_path / "d"
    conf = ["-c", str(cfg)]
    for args in (
        ["--help"],
        [*conf, "keys", "create", "k1"],
        [*conf, "encrypt", str(src), str(enc), "--key", "k1"],
        [*conf, "decrypt", str(enc), str(dec)],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert "CODE=0\n" in proc.stderr, (args, proc.stderr)
        assert "HEAVY=\n" in proc.stderr, (args, proc.stderr)
    assert dec.read_bytes() == src.read_bytes()


def test_encrypt_decrypt_without_database(tmp_path: Path) -> None:
    # A config whose database does not exist: encrypt/decrypt must not care.
    config = write_config(
        tmp_path / "c.toml", local_config(tmp_path, "postgresql://nobody@127.0.0.1:1/none")
    )
    fsrecrypt("keys", "create", "tenant-a", config=config)
    src = tmp_path / "in.wav"
    original = make_wav(src, 2.0)
    out = json.loads(
        fsrecrypt(
            "encrypt",
            str(src),
            str(tmp_path / "enc"),
            "--key",
            "tenant-a",
            "--context",
            "tenant_id=t1",
            "--context",
            "recording_id=r1",
            config=config,
        ).stdout
    )
    assert out["plaintext_bytes"] == len(original)
    blob = (tmp_path / "enc").read_bytes()
    assert blob[:3] == b"\x02\x04\x78"
    fsrecrypt("decrypt", str(tmp_path / "enc"), str(tmp_path / "dec.wav"), config=config)
    assert (tmp_path / "dec.wav").read_bytes() == original
    assert stat.S_IMODE((tmp_path / "dec.wav").stat().st_mode) == 0o600


def test_decrypt_failure_leaves_no_partial_output(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml", local_config(tmp_path, "postgresql://x@127.0.0.1:1/x")
    )
    fsrecrypt("keys", "create", "k", config=config)
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(200_000))
    fsrecrypt(
        "encrypt",
        str(src),
        str(tmp_path / "enc"),
        "--key",
        "k",
        "--frame-size",
        "4096",
        config=config,
    )
    blob = bytearray((tmp_path / "enc").read_bytes())
    blob[-5000] ^= 0x40  # a late frame: early frames decrypt fine before the failure
    (tmp_path / "bad").write_bytes(bytes(blob))
    proc = fsrecrypt(
        "decrypt", str(tmp_path / "bad"), str(tmp_path / "out"), config=config, check=False
    )
    assert proc.returncode == 1
    assert "fsrecrypt: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    truncated = bytes(blob[: len(blob) // 2])
    (tmp_path / "trunc").write_bytes(truncated)
    proc = fsrecrypt(
        "decrypt", str(tmp_path / "trunc"), str(tmp_path / "out"), config=config, check=False
    )
    assert proc.returncode == 1 and not (tmp_path / "out").exists()


def test_keys_list_never_prints_material(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml", local_config(tmp_path, "postgresql://x@127.0.0.1:1/x")
    )
    fsrecrypt("keys", "create", "alpha", config=config)
    fsrecrypt("keys", "create", "beta", config=config)
    listing = fsrecrypt("keys", "list", config=config).stdout
    ring = json.loads((tmp_path / "keyring.json").read_text())
    assert [line.split("\t")[0] for line in listing.splitlines()] == ["alpha", "beta"]
    for entry in ring["keys"].values():
        assert entry["material"] not in listing
    assert stat.S_IMODE((tmp_path / "keyring.json").stat().st_mode) == 0o600
    dup = fsrecrypt("keys", "create", "alpha", config=config, check=False)
    assert dup.returncode != 0 and "already" in dup.stderr.lower()


def test_keyring_readable_by_others_is_refused(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml", local_config(tmp_path, "postgresql://x@127.0.0.1:1/x")
    )
    fsrecrypt("keys", "create", "k", config=config)
    os.chmod(tmp_path / "keyring.json", 0o644)
    (tmp_path / "in").write_bytes(b"hello")
    proc = fsrecrypt(
        "encrypt",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "--key",
        "k",
        config=config,
        check=False,
    )
    assert proc.returncode == 1
    assert "chmod 600" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_migrate_create_db_is_idempotent(tmp_path: Path) -> None:
    from tests.support import pg

    name = f"fsrecrypt_test_{unique('m').replace('-', '_')}"
    dsn = pg.ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    config = write_config(tmp_path / "c.toml", local_config(tmp_path, dsn))
    try:
        first = fsrecrypt("migrate", "--create-db", config=config).stdout
        assert "applied 0001_initial" in first
        assert "up to date" in fsrecrypt("migrate", config=config).stdout
    finally:
        pg.drop_database(name)
    missing = fsrecrypt("migrate", config=config, check=False)
    assert missing.returncode == 1 and "database unavailable" in missing.stderr


@pytest.mark.integration
def test_ingest_and_get_local(cfg: Path, tmp_path: Path) -> None:
    fsrecrypt("keys", "create", "acme-key", config=cfg)
    tenant = unique("acme")
    fsrecrypt("tenants", "add", tenant, "--key", "acme-key", config=cfg)
    assert tenant in fsrecrypt("tenants", "list", config=cfg).stdout
    wav = tmp_path / "recordings" / "a.wav"
    original = make_wav(wav, 3.0, seed=7)
    result = json.loads(
        fsrecrypt("ingest", str(wav), "--tenant", tenant, "--call-uuid", "u-1", config=cfg).stdout
    )
    assert result["plaintext_deleted"] and not wav.exists()
    assert result["object_key"].endswith(".esdk")
    out = tmp_path / "back.wav"
    fsrecrypt("get", result["recording_id"], "-o", str(out), config=cfg)
    assert out.read_bytes() == original
    # The stored object is a plain ESDK message: `decrypt` reads it from the keyring alone.
    obj = tmp_path / "objects" / result["object_key"]
    fsrecrypt("decrypt", str(obj), str(tmp_path / "raw.wav"), config=cfg)
    assert (tmp_path / "raw.wav").read_bytes() == original
    unknown = fsrecrypt(
        "get", "00000000-0000-0000-0000-000000000000", "-o", str(out), config=cfg, check=False
    )
    assert unknown.returncode == 1 and "no recording" in unknown.stderr


@pytest.mark.integration
def test_ingest_and_get_s3_kms(tmp_path: Path, pg_dsn: str, moto_server, s3_bucket) -> None:
    config = write_config(
        tmp_path / "c.toml", s3_config(tmp_path, pg_dsn, moto_server.endpoint_url, s3_bucket.name)
    )
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    arn = fsrecrypt("keys", "create", unique("acme"), config=config, env=env).stdout.strip()
    assert arn.startswith("arn:aws:kms:")
    tenant = unique("acme")
    fsrecrypt("tenants", "add", tenant, "--key", arn, config=config, env=env)
    wav = tmp_path / "recordings" / "b.wav"
    original = make_wav(wav, 1.5, seed=8)
    result = json.loads(
        fsrecrypt("ingest", str(wav), "--tenant", tenant, config=config, env=env).stdout
    )
    out = tmp_path / "back.wav"
    fsrecrypt("get", result["recording_id"], "-o", str(out), config=config, env=env)
    assert out.read_bytes() == original


def test_config_errors_name_file_key_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline]\ndelete_plantext = true\n")
    proc = fsrecrypt("config", "check", config=bad, check=False)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "delete_plantext" in proc.stderr
    bad.write_text("[pipeline]\nframe_size = 1000\n")
    proc = fsrecrypt("config", "check", config=bad, check=False)
    assert "multiple of 4096" in proc.stderr
    proc = fsrecrypt("config", "check", config=tmp_path / "missing.toml", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsrecrypt.cli",
            "--debug",
            "-c",
            str(tmp_path / "nope.toml"),
            "config",
            "check",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_help_lists_every_command_without_importing_command_modules() -> None:
    """``--help`` lists commands from ``COMMAND_SUMMARIES``: no command module, no config parser."""
    probe = (
        "import sys\n"
        "sys.argv = ['fsrecrypt', '--help']\n"
        "from fsrecrypt.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('fsrecrypt.') "
        "and m not in ('fsrecrypt.cli', 'fsrecrypt.errors'))\n"
        "print('LOADED=' + ','.join(loaded), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert "LOADED=\n" in proc.stderr, proc.stderr
    from fsrecrypt.cli import LAZY_COMMANDS

    listed = proc.stdout.partition("Commands:")[2].split()
    for name in LAZY_COMMANDS:
        assert name in listed, f"{name} missing from --help:\n{proc.stdout}"


@pytest.mark.parametrize("width", [40, 80, 200])
def test_command_summaries_give_the_listing_click_prints_from_the_commands(width: int) -> None:
    """Each summary is its command's own first sentence, shortened and laid out by click."""
    import click

    from fsrecrypt.cli import COMMAND_SUMMARIES, LAZY_COMMANDS, main

    assert set(COMMAND_SUMMARIES) == set(LAZY_COMMANDS)
    ctx = click.Context(main, info_name="fsrecrypt", terminal_width=width, max_content_width=width)
    for name, summary in COMMAND_SUMMARIES.items():
        command = main.get_command(ctx, name)
        assert command is not None, name
        assert summary == command.get_short_help_str(limit=10_000), name
    ours, clicks = ctx.make_formatter(), ctx.make_formatter()
    main.format_commands(ctx, ours)
    click.Group.format_commands(main, ctx, clicks)
    assert ours.getvalue() == clicks.getvalue()
    assert "encrypt" in ours.getvalue()
