"""``verify`` tells a permission problem from damage.

Before, an object the running user may not read (written by root, verify
run as the service user) was reported like a damaged one: "failed
verification ... Restore each named object from a backup". Now EACCES/EPERM
is ``ObjectAccessDenied``: listed as DENIED, with its own message and hint,
and never the backup advice unless something really is damaged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fsrecrypt import db
from fsrecrypt.pipeline import Services, ingest_file
from tests.support.daemon import ROOT
from tests.support.factories import local_config, make_wav, unique, write_config

NOBODY = 65534
CLI = (sys.executable, "-c", "from fsrecrypt.cli import main; main()")


def _chown_tree(path: Path) -> None:
    os.chown(path, NOBODY, NOBODY)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), NOBODY, NOBODY)


def _verify_as_nobody(cfg: Path) -> subprocess.CompletedProcess[str]:
    assert os.geteuid() == 0, "this test runs verify as another user: run it as root"
    setpriv = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    return subprocess.run(
        [*setpriv, *CLI, "-c", str(cfg), "verify"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_verify_says_permission_not_damage(tmp_path: Path, fresh_dsn: str) -> None:
    db.migrate(fresh_dsn)
    for p in [tmp_path, *tmp_path.parents]:
        if p != Path("/") and p.stat().st_mode & 0o005 != 0o005:
            p.chmod(p.stat().st_mode | 0o055)
    config = local_config(tmp_path, fresh_dsn)
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    cfg.chmod(0o644)
    svc = Services(config)
    try:
        key = unique("k")
        svc.keys.create_key(key)
        svc.db.add_tenant("acme", key)
        recs = []
        for name in ("a", "b"):
            wav = tmp_path / "recordings" / f"{name}.wav"
            make_wav(wav, 0.2, seed=ord(name))
            recs.append(ingest_file(svc, str(wav), "acme").recording)
    finally:
        svc.close()
    objects = tmp_path / "objects"
    _chown_tree(objects)
    os.chown(tmp_path / "keyring.json", NOBODY, NOBODY)
    denied = objects / recs[0].s3_path
    os.chown(denied, 0, 0)  # ingest run as root left a root-owned object
    denied.chmod(0o600)

    res = _verify_as_nobody(cfg)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert f"DENIED {recs[0].id}" in out and "permission denied reading object" in out
    assert "owned by uid 0" in out
    assert "nothing found damaged" in out
    assert "backup" not in out  # no advice to restore an intact object
    assert f"FAIL {recs[1].id}" not in out

    # real damage next to it: both are told, each with its own word
    damaged = objects / recs[1].s3_path
    data = bytearray(damaged.read_bytes())
    data[-40] ^= 0x01
    damaged.write_bytes(bytes(data))
    res = _verify_as_nobody(cfg)
    out = res.stdout + res.stderr
    assert f"FAIL {recs[1].id}" in out and f"DENIED {recs[0].id}" in out
    assert "1 of 2 recording(s) failed verification" in out
    assert "1 more could not be read by this user (permission, not damage" in out
