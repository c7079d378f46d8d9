"""``fsrecrypt config check`` output is pasted into tickets: it must show no password."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsrecrypt.config import redact_dsn

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-Zq9"


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (
            f"postgresql://fsr:{SECRET}@db.example:5432/fsrecrypt",
            "postgresql://fsr:***@db.example:5432/fsrecrypt",
        ),
        (f"postgresql://fsr:{SECRET}@db.example", "postgresql://fsr:***@db.example"),
        (f"postgres://fsr:p@{SECRET}@db/x", "postgres://fsr:***@db/x"),  # an unescaped @ inside
        (
            f"postgresql://fsr@db/x?sslmode=require&password={SECRET}",
            "postgresql://fsr@db/x?sslmode=require&password=***",
        ),
        (f"host=db user=fsr password={SECRET} dbname=x", "host=db user=fsr password=*** dbname=x"),
        (f"host=db PASSWORD = '{SECRET} \\' x' dbname=x", "host=db PASSWORD = *** dbname=x"),
        ("postgresql://fsr@db/x", "postgresql://fsr@db/x"),
        ("", ""),
    ],
)
def test_redact_dsn(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown
    assert SECRET not in redact_dsn(dsn)


@pytest.mark.parametrize(
    "dsn",
    [f"postgresql://fsr:{SECRET}@127.0.0.1:1/x", f"host=127.0.0.1 password={SECRET} dbname=x"],
)
def test_config_check_shows_no_password(tmp_path: Path, dsn: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[database]\ndsn = "{dsn}"\n[freeswitch]\npassword = "{SECRET}-fs"\n'
        f'[keys]\nprovider = "local"\nkeyring = "{tmp_path / "k.json"}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fsrecrypt.cli", "-c", str(config), "config", "check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    settings = json.loads(proc.stdout.partition("\n")[2])
    assert settings["freeswitch"]["password"] == "***"
    assert "***" in settings["database"]["dsn"]
