"""``fsrecrypt health`` rates what the daemon's own process can do, not what root can.

Before, health checked the keyring and the store with the rights of whoever
ran it: root read a keyring the service user could not, said "usable", and
exited 0 while every recording failed with "Permission denied". Here the
daemon is a real subprocess running as ``nobody`` (setpriv), the keyring is
root's 0000 file and the store root's directory: root's own checks pass,
the daemon's heartbeat says otherwise, and health is down with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import ROOT, DaemonEnv, daemon_env  # noqa: F401

NOBODY = 65534
CLI = (sys.executable, "-c", "from fsrecrypt.cli import main; main()")


def _as_nobody() -> tuple[str, ...]:
    # The suite runs as root (setpriv needs it to change user): the point is
    # that root's checks pass where the service user's fail.
    assert os.geteuid() == 0, "these tests run the daemon as another user: run them as root"
    return ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def _traversable(path: Path) -> None:
    """Let ``nobody`` reach ``path`` (pytest's tmp dirs are 0700)."""
    for p in [path, *path.parents]:
        if p == Path("/"):
            break
        mode = p.stat().st_mode & 0o777
        if mode & 0o005 != 0o005:  # the daemon's descriptor walk opens each directory
            p.chmod(mode | 0o055)


def _health(config_path: Path) -> tuple[int, dict]:
    out = subprocess.run(
        [*CLI, "-c", str(config_path), "health", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.returncode, json.loads(out.stdout)


def test_health_is_down_when_the_daemons_process_cannot_use_keyring_or_store(
    daemon_env: DaemonEnv,  # noqa: F811
) -> None:
    env = daemon_env
    _traversable(env.tmp)
    run = env.tmp / "run"
    run.mkdir()
    for p in (run, env.recordings):
        os.chown(p, NOBODY, NOBODY)
    keyring = Path(env.keys["keyring"])
    keyring.chmod(0)  # root reads it anyway; the service user cannot
    env.start(prefix=_as_nobody())
    config_path = env.tmp / "fsrecrypt.toml"
    config_path.chmod(0o644)

    heartbeat = run / "heartbeat"
    env.wait(
        lambda: heartbeat.exists() and "self_checks" in heartbeat.read_text(),
        timeout=30,
        what="a heartbeat with the daemon's self checks",
    )
    code, doc = _health(config_path)
    checks = doc["checks"]
    # root's own view: fine (this is what health used to rate)
    assert checks["keys"]["status"] == "healthy", checks
    assert checks["store"]["status"] == "healthy", checks
    # the daemon's view: it cannot open the keyring
    access = checks["daemon-access"]
    assert access["status"] == "down", checks
    assert "cannot use its keyring/KMS" in access["detail"]
    assert "Permission denied" in access["detail"]
    assert doc["status"] == "down" and code == 2

    # A recording it cannot encrypt: failed since the last store -> the daemon check says so.
    path, _ = env.write_wav()
    env.emit_stop(path)
    env.wait_status(path, "failed", timeout=60)
    env.wait(
        lambda: json.loads(heartbeat.read_text()).get("failed_since_store", 0) >= 1,
        timeout=30,
        what="the failure in the heartbeat",
    )
    code, doc = _health(config_path)
    view = doc["checks"]["daemon"]
    assert view["status"] == "degraded", doc
    assert "failed 1 recording(s) since its last successful store" in view["detail"]
    assert code == 2


def test_health_is_down_when_the_daemon_cannot_write_its_store(
    daemon_env: DaemonEnv,  # noqa: F811
) -> None:
    env = daemon_env
    _traversable(env.tmp)
    run = env.tmp / "run"
    run.mkdir()
    keyring = Path(env.keys["keyring"])
    for p in (run, env.recordings, keyring):
        os.chown(p, NOBODY, NOBODY)
    os.chown(keyring.parent, NOBODY, NOBODY)  # the keyring's lock file lives beside it
    # the store directory stays root's 0755: root writes it, nobody cannot
    env.start(prefix=_as_nobody())
    config_path = env.tmp / "fsrecrypt.toml"
    heartbeat = run / "heartbeat"
    env.wait(
        lambda: heartbeat.exists() and "self_checks" in heartbeat.read_text(),
        timeout=30,
        what="a heartbeat with the daemon's self checks",
    )
    code, doc = _health(config_path)
    checks = doc["checks"]
    assert checks["store"]["status"] == "healthy", checks
    assert checks["daemon-access"]["status"] == "down", checks
    assert "cannot use its store" in checks["daemon-access"]["detail"]
    assert "not writable" in checks["daemon-access"]["detail"]
    assert code == 2
