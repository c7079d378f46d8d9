"""README "Try the API": its curl lines, run exactly as written against a real ``fsrecrypt serve``.

The block is taken from README.rst as it is (no copy here to drift), run by
bash with ``FSRECRYPT_URL`` and ``API_KEY`` set and a ``call.wav`` beside it:
the upload must store the file, the ranged stream must give exactly those
bytes of it, and the download the whole file.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from fsrecrypt.web import create_api_key
from tests.support.factories import make_wav
from tests.support.serve import serve_process
from tests.web.test_web_server import make_setup

README = Path(__file__).resolve().parents[2] / "README.rst"


def try_the_api_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\nTry the API\n===========\n", 1)[1].split("\n=====", 1)[0]
    match = re.search(r"^\.\. code-block:: sh\n\n((?:    .*\n|\n)+)", section, re.M)
    assert match, "no sh code block under 'Try the API'"
    return "\n".join(line[4:] for line in match.group(1).splitlines())


def test_the_readme_curl_lines_work_as_written(pg_dsn: str, tmp_path: Path) -> None:
    script = try_the_api_block()
    for needed in ('/v1/recordings"', "/playback", "-r 16044-32043", "/download"):
        assert needed in script
    services, cfg, tenant, _key = make_setup(tmp_path, pg_dsn, playback={"metrics_listen": ""})
    _row, key = create_api_key(services, tenant, "alice", roles=("ingest", "listen", "download"))
    work = tmp_path / "work"
    work.mkdir()
    audio = make_wav(work / "call.wav", seconds=4.0, seed=5)
    with serve_process(cfg, tmp_path / "serve.log") as (port, _pid):
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env={
                "PATH": "/usr/bin:/bin",
                "FSRECRYPT_URL": f"http://127.0.0.1:{port}",
                "API_KEY": key,
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "serve.log").read_text()
        (stored,) = services.db.recordings(call_uuid="7d0c8a6e-1d2b-4c5d-9e8f-0a1b2c3d4e5f")
        assert stored.status == "stored" and stored.encryption_metadata["origin"] == "upload"
        assert (work / "part.wav").read_bytes() == audio[16044:32044]
        assert (work / f"{stored.id}.wav").read_bytes() == audio
        # stream and download rows are written as each body closes (after the client's last byte)
        deadline = time.monotonic() + 10
        while True:
            actions = [r["action"] for r in services.db.audit_rows(recording_id=stored.id)]
            if "download" in actions or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert actions[0] == "encrypt" and "stream" in actions and "download" in actions
    services.close()
