"""``systemd/fsrecrypt-serve.service``: loads cleanly and is rated OK (or better) for exposure.

Like the daemon's unit test (``test_install.py``), offline against a temporary
root holding systemd's own units, the unit, and an executable where its
ExecStart= points: ``systemd-analyze verify`` must be silent and
``systemd-analyze security --offline=true`` must rate it PERFECT, SAFE or OK.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "fsrecrypt-serve.service"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    subprocess.run(["bash", str(ROOT / ".ci" / "ensure-systemd-analyze")], check=True)
    root = tmp_path_factory.mktemp("serve-unit")
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy2(UNIT, root / "etc/systemd/system" / UNIT.name)
    execstart = next(
        line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")
    )
    command = root / execstart.removeprefix("ExecStart=").split()[0].lstrip("/")
    command.parent.mkdir(parents=True)
    command.write_text("#!/bin/sh\nexit 0\n")
    command.chmod(0o755)
    return root


def _analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args, f"--root={root}", "--no-pager", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_unit_verifies(root: Path) -> None:
    res = _analyze(root, "verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_serve_unit_is_rated_ok_or_better(root: Path) -> None:
    res = _analyze(root, "security", "--offline=true")
    m = re.search(
        r"Overall exposure level for fsrecrypt-serve\.service: ([0-9.]+) (\w+)", res.stdout
    )
    assert m, res.stdout[-2000:] + res.stderr
    assert m.group(2) in ("PERFECT", "SAFE", "OK"), m.group(0)
    assert float(m.group(1)) <= 2.0, m.group(0)


def test_serve_unit_runs_serve_as_the_service_user_without_the_daemons_runtime_dir() -> None:
    lines = UNIT.read_text().splitlines()
    assert "User=fsrecrypt" in lines
    assert any(line.startswith("ExecStart=") and line.endswith(" serve") for line in lines)
    # /run/fsrecrypt belongs to fsrecrypt.service: stopping serve must not remove it
    assert not any(line.startswith("RuntimeDirectory=") for line in lines)
