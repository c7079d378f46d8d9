"""An unreadable recordings directory is refused as ``unreadable``, not as a forged ``path``.

Before, a permission problem (the service user not in the freeswitch group)
was counted and logged exactly like a path outside the recordings
directories, pointing the operator at the dialplan instead of at the mode.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from fsrecrypt.daemon import Daemon
from fsrecrypt.daemon.jobs import Job
from fsrecrypt.errors import PathRefused, PathUnreadable
from fsrecrypt.plaintext import open_source, vet_path
from tests.support.factories import local_config, make_wav, unique


@pytest.fixture
def locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``recordings/locked``: opening it fails with EACCES (as for a non-root user; even root)."""
    locked = tmp_path / "recordings" / "locked"
    locked.mkdir(parents=True)
    make_wav(locked / "call.wav", 0.2, seed=1)
    real = os.open

    def guarded(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == "locked" or str(path) == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)
    return locked


def test_a_denied_directory_is_unreadable_not_forged(locked: Path, tmp_path: Path) -> None:
    dirs = [str(tmp_path / "recordings")]
    for check in (vet_path, open_source):
        with pytest.raises(PathUnreadable) as info:
            check(str(locked / "call.wav"), dirs)
        assert info.value.reason == "unreadable"
        assert "permission" in info.value.one_line().lower()
    # A real forgery keeps its own reason.
    with pytest.raises(PathRefused) as info:
        vet_path("/etc/passwd", dirs)
    assert info.value.reason == "path"


@pytest.mark.integration
def test_the_daemon_counts_an_unreadable_file_under_its_own_reason(
    locked: Path, tmp_path: Path, pg_dsn: str
) -> None:
    tenant_name = unique("t")
    daemon = Daemon(local_config(tmp_path, pg_dsn))
    svc = daemon.services
    try:
        key = unique("k")
        svc.keys.create_key(key)
        svc.db.add_tenant(tenant_name, key)
        daemon.runner.attempt(Job(path=str(locked / "call.wav"), tenant_name=tenant_name))
        refused = daemon.rt.metrics.refused
        assert refused.labels("unreadable")._value.get() == 1
        assert refused.labels("path")._value.get() == 0
        assert (locked / "call.wav").exists()
    finally:
        svc.close()


@pytest.mark.integration
def test_the_sweep_reports_an_unlistable_directory_once(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "recordings" / "locked"
    locked.mkdir(parents=True)
    real = os.scandir

    def guarded(path: Any = ".") -> Any:
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", guarded)
    daemon = Daemon(local_config(tmp_path, pg_dsn, pipeline={"quiet_period": 0.0}))
    try:
        daemon.sweeper.sweep()
        daemon.sweeper.sweep()  # still unreadable: not reported again
        refused = daemon.rt.metrics.refused
        assert refused.labels("unreadable")._value.get() == 1
        assert daemon.sweeper.unreadable_dirs == {str(locked)}
        monkeypatch.setattr(os, "scandir", real)
        daemon.sweeper.sweep()
        assert daemon.sweeper.unreadable_dirs == set()
    finally:
        daemon.services.close()
