"""A real ``fsrecrypt serve`` process (gevent's WSGI server) over real HTTP.

The Flask test client cannot show what a player sees when a frame fails to
authenticate mid-stream: here a socket client reads the response and must get
exactly the bytes before the bad frame, then a cut connection (the body is
shorter than its Content-Length), never the bad frame's bytes.
"""

from __future__ import annotations

import http.client
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fsrecrypt import pipeline
from fsrecrypt.config import Config, with_overrides
from fsrecrypt.web import create_api_key
from tests.support.factories import write_config
from tests.support.serve import serve_process
from tests.web.test_web_app import _base_config, wav_bytes


@contextmanager
def serve(config_path: Path, log_path: Path) -> Iterator[str]:
    """Run `fsrecrypt serve` on a free loopback port; yield its base URL; stop it with SIGTERM."""
    with serve_process(config_path, log_path) as (port, _pid):
        yield f"http://127.0.0.1:{port}"


def make_setup(root: Path, dsn: str, **sections: dict) -> tuple[pipeline.Services, Path, str, str]:
    """Config file, a tenant with a local key, and an API key for it."""
    base = _base_config(root, dsn)
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    config = with_overrides(Config(), **base)
    cfg = write_config(root / "fsrecrypt.toml", config)
    services = pipeline.Services(config)
    tenant = f"srv-{uuid.uuid4().hex[:8]}"
    services.db.add_tenant(tenant, services.keys.create_key(f"srv-{uuid.uuid4().hex[:6]}"))
    _row, key = create_api_key(services, tenant, "supervisor@example.com")
    return services, cfg, tenant, key


def ingest(services: pipeline.Services, root: Path, tenant: str, data: bytes) -> str:
    path = root / "recordings" / f"{uuid.uuid4().hex}.wav"
    path.write_bytes(data)
    outcome = pipeline.ingest_file(services, str(path), tenant, call_uuid=str(uuid.uuid4()))
    return outcome.recording.id


def test_integrity_failure_mid_stream_cuts_the_connection(pg_dsn: str, tmp_path: Path) -> None:
    services, cfg, tenant, key = make_setup(tmp_path, pg_dsn)
    frame = services.config.pipeline.frame_size
    original = wav_bytes(2.0, seed=21)  # 32044 bytes: 8 frames of 4096
    rid = ingest(services, tmp_path, tenant, original)
    rec = services.db.recording(rid)
    blob = bytearray(services.store.read_bytes(rec.s3_path))
    bad_seq = 5
    offset = rec.encryption_metadata["header_size"] + (bad_seq - 1) * (frame + 32) + 4 + 12 + 7
    blob[offset] ^= 0x80
    services.store.delete(rec.s3_path)
    services.store.put_stream(rec.s3_path, [bytes(blob)])
    good = (bad_seq - 1) * frame

    with serve(cfg, tmp_path / "serve.log") as base:
        port = int(base.rsplit(":", 1)[1])
        for range_header, start in ((None, 0), ("bytes=1000-", 1000)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            headers = {"X-API-Key": key}
            if range_header:
                headers["Range"] = range_header
            conn.request("GET", f"/v1/recordings/{rid}/stream", headers=headers)
            resp = conn.getresponse()
            assert resp.status == (206 if range_header else 200)
            assert int(resp.headers["Content-Length"]) == len(original) - start
            with pytest.raises(http.client.IncompleteRead) as info:
                resp.read()
            assert info.value.partial == original[start:good]
            conn.close()
        # an untouched range still plays on the same server
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "GET", f"/v1/recordings/{rid}/stream", headers={"X-API-Key": key, "Range": "bytes=0-99"}
        )
        resp = conn.getresponse()
        assert resp.status == 206 and resp.read() == original[:100]
        conn.close()

    rows = [r for r in services.db.audit_rows(recording_id=rid, action="stream")]
    failed = [r for r in rows if not r["success"]]
    assert len(failed) == 2
    assert {r["details"]["bytes_sent"] for r in failed} == {good, good - 1000}
    assert all("AuthenticationFailed" in r["error_message"] for r in failed)
    log = (tmp_path / "serve.log").read_text()
    assert "stream aborted" in log and "Traceback" not in log
    services.close()
