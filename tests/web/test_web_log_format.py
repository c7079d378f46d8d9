"""``fsrecrypt serve`` logs JSON lines like the daemon when ``[logging] format = "json"``.

Before, serve always wrote plain text, so one log pipeline could not read
both services.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import logging, sys
from fsrecrypt.web.server import configure_logging
configure_logging("info", sys.argv[1])
logging.getLogger("fsrecrypt.web.access").info('GET /v1/x "forged\\nline" 200')
logging.getLogger("fsrecrypt.web").debug("not shown at info")
try:
    raise ValueError("boom")
except ValueError:
    logging.getLogger("fsrecrypt.web.error").exception("handler failed")
"""


def _run(fmt: str) -> list[str]:
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    return res.stderr.splitlines()


def test_json_format_gives_one_json_object_per_record() -> None:
    lines = _run("json")
    assert len(lines) == 2, lines  # the newline in the message cannot split a record
    access, error = (json.loads(line) for line in lines)
    assert access["level"] == "info" and access["logger"] == "fsrecrypt.web.access"
    assert access["event"] == 'GET /v1/x "forged\\nline" 200'.replace("\\n", "\n")
    assert access["timestamp"].endswith("Z")
    assert error["level"] == "error" and "ValueError: boom" in error["exception"]


def test_console_format_stays_plain_text() -> None:
    lines = _run("console")
    assert "INFO fsrecrypt.web.access: GET /v1/x" in lines[0]
    assert not lines[0].startswith("{")
