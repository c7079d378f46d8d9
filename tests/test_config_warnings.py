"""``fsrecrypt config check`` warns about what is valid but will not work as meant.

Before, a recordings directory that does not exist or that the service user
cannot read, and an ``FSRECRYPT_*`` variable with a typo, all passed the
check silently (the variable is simply ignored; the directory never swept).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.config import Config, config_warnings, known_environment_names, with_overrides


def _config(*dirs: Path) -> Config:
    return with_overrides(Config(), freeswitch={"recordings_dirs": tuple(str(d) for d in dirs)})


def test_every_key_has_its_environment_name() -> None:
    names = known_environment_names()
    assert {
        "FSRECRYPT_CONFIG",
        "FSRECRYPT_PIPELINE_MAX_ATTEMPTS",
        "FSRECRYPT_DATABASE_DSN",
    } <= names
    assert "FSRECRYPT_PIPELINE_MAX_ATTEMPT" not in names


def test_missing_and_unreadable_recordings_dirs_are_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok, locked, missing = tmp_path / "ok", tmp_path / "locked", tmp_path / "missing"
    ok.mkdir()
    locked.mkdir()
    real = os.access

    def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
        # As root every directory is readable: pretend to be the service user.
        return False if str(path) == str(locked) else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    warnings = config_warnings(_config(ok, locked, missing), environ={})
    assert len(warnings) == 2
    assert str(missing) in warnings[1] and "does not exist" in warnings[1]
    assert str(locked) in warnings[0] and "not readable" in warnings[0]


def test_unknown_fsrecrypt_variables_are_warned_about(tmp_path: Path) -> None:
    env = {
        "FSRECRYPT_PIPELINE_MAX_ATTEMPT": "3",  # typo
        "fsrecrypt_database_dsn": "x",  # lower case: not read
        "FSRECRYPT_PIPELINE_MAX_ATTEMPTS": "3",  # fine
        "FSRECRYPT_CONFIG": "/etc/fsrecrypt/fsrecrypt.toml",  # fine
        "FSRECRYPT_\udcff\x00": "x",  # hostile name: shown escaped
        "PATH": "/usr/bin",
    }
    warnings = config_warnings(_config(tmp_path), environ=env)
    joined = "\n".join(warnings)
    assert len(warnings) == 3, joined
    assert "FSRECRYPT_PIPELINE_MAX_ATTEMPT matches no setting" in joined
    assert "did you mean FSRECRYPT_PIPELINE_MAX_ATTEMPTS?" in joined
    assert "did you mean FSRECRYPT_DATABASE_DSN?" in joined
    assert "\x00" not in joined and "\\udcff" in joined


def test_config_check_prints_the_warnings_on_stderr_and_exits_0(tmp_path: Path) -> None:
    cfg = tmp_path / "fsrecrypt.toml"
    cfg.write_text(f'[freeswitch]\nrecordings_dirs = ["{tmp_path / "nowhere"}"]\n')
    res = CliRunner().invoke(
        main, ["config", "check", "-c", str(cfg)], env={"FSRECRYPT_KEYS_PROVIDR": "local"}
    )
    assert res.exit_code == 0, res.output
    assert "configuration OK" in res.stdout
    assert f"warning: recordings directory {tmp_path / 'nowhere'} does not exist" in res.stderr
    assert "warning: environment variable FSRECRYPT_KEYS_PROVIDR matches no setting" in res.stderr


def test_trusted_proxies_reaching_the_internet_are_warned_about() -> None:
    from fsrecrypt.config import Config, config_warnings, with_overrides

    def warned(*cidrs: str) -> list[str]:
        config = with_overrides(
            Config(), playback={"trusted_proxies": cidrs}, freeswitch={"recordings_dirs": ("/",)}
        )
        return [w for w in config_warnings(config, {}) if "trusted_proxies" in w]

    assert warned("10.0.0.0/8", "fd00::/8", "127.0.0.1") == []
    assert len(warned("0.0.0.0/0")) == 1
    assert len(warned("::/0", "8.8.8.0/24")) == 2
