"""Root against the service user's state: refused, with the owner and the command to run.

Before, ``fsrecrypt keys create`` run as root rewrote the service user's
keyring as a root-owned file, and the daemon then failed every recording
with "Permission denied". Now every state file belongs to the service user
and the CLI, run as root against state another user owns, refuses (typed
error naming the owner and ``sudo -u OWNER fsrecrypt ...``) unless
``--allow-root`` / ``FSRECRYPT_ALLOW_ROOT=1`` says it is a recovery.
"""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.keys import LocalKeyring
from tests.support.factories import local_config, write_config

NOBODY = 65534


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    assert os.geteuid() == 0, "the ownership rule applies to root: run the suite as root"
    state = tmp_path / "state"
    state.mkdir()
    config = local_config(
        tmp_path,
        "postgresql://postgres@127.0.0.1:1/none",
        keys={"keyring": str(state / "keyring.json")},
        storage={"path": str(state / "objects")},
        playback={"signing_key_file": str(state / "url-signing.key")},
    )
    LocalKeyring(state / "keyring.json").create_key("old")
    return state, write_config(tmp_path / "fsrecrypt.toml", config)


def test_root_is_refused_against_the_service_users_keyring(tmp_path: Path) -> None:
    state, cfg = _setup(tmp_path)
    keyring = state / "keyring.json"
    os.chown(state, NOBODY, NOBODY)
    os.chown(keyring, NOBODY, NOBODY)
    before = keyring.read_bytes()
    res = CliRunner().invoke(main, ["-c", str(cfg), "keys", "create", "new"], env={})
    assert res.exit_code != 0
    assert "refusing to run as root" in res.output
    assert "belongs to 'nobody'" in res.output
    assert "sudo -u nobody fsrecrypt keys create" in res.output
    assert keyring.read_bytes() == before and keyring.stat().st_uid == NOBODY

    # a keyring not created yet: its directory's owner decides
    keyring.unlink()
    res = CliRunner().invoke(main, ["-c", str(cfg), "keys", "create", "new"], env={})
    assert res.exit_code != 0 and "belongs to 'nobody'" in res.output
    assert not keyring.exists()

    # read-only diagnostics stay allowed; the override is explicit
    res = CliRunner().invoke(main, ["-c", str(cfg), "config", "check"], env={})
    assert "refusing to run as root" not in res.output
    res = CliRunner().invoke(
        main, ["-c", str(cfg), "keys", "create", "new"], env={"FSRECRYPT_ALLOW_ROOT": "1"}
    )
    assert res.exit_code == 0, res.output
    assert keyring.stat().st_mode & 0o777 == 0o600


def test_root_owned_state_and_the_flag(tmp_path: Path) -> None:
    state, cfg = _setup(tmp_path)
    res = CliRunner().invoke(main, ["-c", str(cfg), "keys", "create", "k2"], env={})
    assert res.exit_code == 0, res.output  # root's own state: nothing to refuse
    (state / "objects").mkdir()
    os.chown(state / "objects", NOBODY, NOBODY)
    res = CliRunner().invoke(main, ["-c", str(cfg), "keys", "list"], env={})
    assert res.exit_code != 0 and "local store" in res.output
    res = CliRunner().invoke(main, ["--allow-root", "-c", str(cfg), "keys", "list"], env={})
    assert "refusing" not in res.output and res.exit_code == 0, res.output
