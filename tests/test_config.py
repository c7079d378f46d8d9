"""Configuration: the example file documents every key; bad input fails fast."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fsrecrypt.config import Config, load_config
from fsrecrypt.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "conf" / "fsrecrypt.toml"


def test_example_file_documents_every_key_with_its_default() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    defaults = Config()
    text = EXAMPLE.read_text().splitlines()
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        assert section.name in raw, f"[{section.name}] missing from the example"
        for key, value in dataclasses.asdict(getattr(defaults, section.name)).items():
            assert key in raw[section.name], f"[{section.name}] {key} missing from the example"
            file_value = raw[section.name][key]
            assert (tuple(file_value) if isinstance(file_value, list) else file_value) == value
            # every key has a comment line right above it (or above its group)
            index = next(i for i, line in enumerate(text) if line.startswith(f"{key} ="))
            assert any(text[j].startswith("#") for j in range(max(0, index - 4), index)), key
    assert load_config(EXAMPLE).pipeline.frame_size == 65536


def test_environment_overrides_every_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSRECRYPT_PIPELINE_CONCURRENCY", "9")
    monkeypatch.setenv("FSRECRYPT_PIPELINE_DELETE_PLAINTEXT", "false")
    monkeypatch.setenv("FSRECRYPT_FREESWITCH_RECORDINGS_DIRS", "/a,/b")
    monkeypatch.setenv("FSRECRYPT_DATABASE_DSN", "postgresql://x/y")
    monkeypatch.setenv("FSRECRYPT_PIPELINE_RETRY_BASE", "0.25")
    config = load_config(EXAMPLE)
    assert config.pipeline.concurrency == 9
    assert config.pipeline.delete_plaintext is False
    assert config.freeswitch.recordings_dirs == ("/a", "/b")
    assert config.database.dsn == "postgresql://x/y"
    assert config.pipeline.retry_base == 0.25


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[nope]\nx = 1\n", "unknown section [nope]"),
        ("[keys]\nprovider = 'vault'\n", "provider must be"),
        ("[storage]\nbackend = 's3'\n", "bucket is required"),
        ("[pipeline]\nconcurrency = 'many'\n", "expected an integer"),
        ("[pipeline]\ndelete_plaintext = 'maybe'\n", "expected true or false"),
        ("[freeswitch]\nrecordings_dirs = ['relative/dir']\n", "not an absolute path"),
        ("[storage]\npart_size = 1024\n", "at least 5 MiB"),
        ("[metrics]\nlisten = 'nonsense'\n", "HOST:PORT"),
        ("not toml at all [", "invalid TOML"),
    ],
)
def test_bad_values_fail_fast(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSRECRYPT_PIPELINE_MAX_ATTEMPTS", "lots")
    with pytest.raises(ConfigError, match="FSRECRYPT_PIPELINE_MAX_ATTEMPTS"):
        load_config(EXAMPLE)


def test_password_file_via_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "esl-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("FSRECRYPT_FREESWITCH_PASSWORD_FILE", "esl-password")
    assert load_config(EXAMPLE).freeswitch.resolved_password() == "s3cret"
    monkeypatch.setenv("FSRECRYPT_FREESWITCH_PASSWORD_FILE", "missing")
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE).freeswitch.resolved_password()
    assert "LoadCredential" in info.value.one_line()


@pytest.mark.parametrize("blocked", ["directory", "file"])
def test_unreadable_config_is_a_clear_error_not_a_traceback(tmp_path: Path, blocked: str) -> None:
    """An operator running the CLI as the wrong user gets what to do, not PermissionError."""
    import os
    import subprocess
    import sys

    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "fsrecrypt.toml"
    config.write_text("[logging]\nlevel = 'info'\n")
    os.chmod(tmp_path, 0o755)
    if blocked == "directory":
        os.chmod(etc, 0o700)  # root's, not searchable by the unprivileged user below
    else:
        os.chmod(etc, 0o755)
        os.chmod(config, 0o600)
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            "from fsrecrypt.cli import main; main()",
            "-c",
            str(config),
            "config",
            "check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert str(config) in result.stderr and "Permission denied" in result.stderr
    assert "sudo -u fsrecrypt" in result.stderr


def test_default_metrics_ports_do_not_collide() -> None:
    """Daemon, serve and a worker on one host each get their own Prometheus port."""
    from fsrecrypt.config import Config

    cfg = Config()
    ports = [cfg.metrics.listen, cfg.playback.metrics_listen, cfg.jobs.metrics_listen]
    assert len(set(ports)) == 3, ports
