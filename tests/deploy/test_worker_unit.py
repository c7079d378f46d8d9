"""The worker's systemd unit: as hardened as the daemon's (``systemd-analyze security``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _exposure(root: Path, unit: str) -> tuple[float, str]:
    sec = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", unit],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+) (\w+)", sec.stdout)
    assert m, sec.stdout[-2000:] + sec.stderr
    return float(m.group(1)), m.group(2)


def test_worker_unit_is_rated_ok_and_no_weaker_than_the_daemon_unit(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / ".ci" / "ensure-systemd-analyze")], check=True)
    units = tmp_path / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for name in ("fsrecrypt.service", "fsrecrypt-worker.service"):
        shutil.copy(ROOT / "systemd" / name, units / name)
    worker, rating = _exposure(tmp_path, "fsrecrypt-worker.service")
    daemon, _ = _exposure(tmp_path, "fsrecrypt.service")
    assert rating in ("PERFECT", "SAFE", "OK"), (worker, rating)
    assert worker <= daemon + 0.05, (worker, daemon)
    text = (units / "fsrecrypt-worker.service").read_text()
    assert " worker\n" in text and "User=fsrecrypt" in text
