"""``fsrecrypt serve`` as operators run it: Prometheus series on their own port, and housekeeping.

Two real servers share one database and one anchor directory: the audit
chain gets anchored by the API alone (no daemon), once per interval however
many servers run; an upload whose server died mid-body (pending, lease run
out) is discarded with an audit row; ``/metrics`` on ``[playback]
metrics_listen`` counts requests by route and status, streamed bytes, time to
first byte and authentication failures by reason.
"""

from __future__ import annotations

import http.client
import re
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from fsrecrypt.config import with_overrides
from tests.support.factories import write_config
from tests.support.moto import free_port
from tests.support.serve import serve_process
from tests.web.test_web_app import wav_bytes
from tests.web.test_web_server import ingest, make_setup


def _get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one series (labels in any order), summed over the labels not given."""
    total = 0.0
    for m in re.finditer(r"^([a-z_]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if m.group(1) == name and all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def _scrape_until(port: int, ready: str) -> str:
    """The metrics page once ``ready`` shows (a request is counted when its body is closed,
    just after the client got its last byte)."""
    deadline = time.monotonic() + 10
    while True:
        status, text = _get(port, "/metrics")
        assert status == 200
        page = text.decode()
        if ready in page or time.monotonic() > deadline:
            return page
        time.sleep(0.1)


def test_metrics_anchoring_and_abandoned_uploads(pg_dsn: str, tmp_path: Path) -> None:
    anchors = tmp_path / "anchors"
    metrics_port = free_port()
    services, cfg, tenant, key = make_setup(
        tmp_path,
        pg_dsn,
        playback={"metrics_listen": f"127.0.0.1:{metrics_port}"},
        audit={"anchor_dir": str(anchors), "anchor_key_file": str(tmp_path / "anchor.key")},
    )
    second_cfg = write_config(
        tmp_path / "second.toml", with_overrides(services.config, playback={"metrics_listen": ""})
    )
    audio = wav_bytes(1.0, seed=61)
    rid = ingest(services, tmp_path, tenant, audio)
    tenant_id = services.db.tenant_by_name(tenant).id
    abandoned, _ = services.db.create_upload(
        tenant_id=tenant_id,
        call_uuid=str(uuid.uuid4()),
        metadata={"origin": "upload"},
        worker="dead-host:1:abcd",
        lease_seconds=0,
    )
    with ExitStack() as stack:
        port, _pid = stack.enter_context(serve_process(cfg, tmp_path / "serve-1.log"))
        stack.enter_context(serve_process(second_cfg, tmp_path / "serve-2.log"))
        # housekeeping: the chain anchored by the API alone, once for both servers
        deadline = time.monotonic() + 30
        while not (anchors.exists() and list(anchors.glob("*.json"))):
            assert time.monotonic() < deadline, "no anchor written by serve"
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while services.db.recording(abandoned.id).status != "discarded":
            assert time.monotonic() < deadline, "the abandoned upload was not discarded"
            time.sleep(0.2)
        time.sleep(1.0)  # both servers' first pass has run
        assert len(list(anchors.glob("*.json"))) == 1
        (row,) = services.db.audit_rows(recording_id=abandoned.id)
        assert not row["success"] and row["action"] == "upload"

        # requests feeding the series
        assert _get(port, "/v1/me", {"X-API-Key": "fsr_0000000000000000_nope"})[0] == 401
        assert _get(port, "/v1/me")[0] == 401
        status, body = _get(
            port, f"/v1/recordings/{rid}/stream", {"X-API-Key": key, "Range": "bytes=100-1099"}
        )
        assert status == 206 and body == audio[100:1100]
        page = _scrape_until(metrics_port, 'route="streamRecording"')
        assert (
            _sample(
                page,
                "fsrecrypt_http_requests_total",
                route="streamRecording",
                method="GET",
                status="206",
            )
            == 1
        )
        assert (
            _sample(
                page, "fsrecrypt_http_requests_total", route="whoAmI", method="GET", status="401"
            )
            == 2
        )
        assert _sample(page, "fsrecrypt_http_streamed_bytes_total") == 1000
        assert (
            _sample(
                page, "fsrecrypt_http_time_to_first_byte_seconds_count", route="streamRecording"
            )
            == 1
        )
        failures = _sample(page, "fsrecrypt_http_auth_failures_total")
        assert failures == 2
        assert "fsrecrypt_http_open_connections" in page
        # the series are not on the API's own port
        assert _get(port, "/metrics")[0] == 404
    services.close()


def test_serve_sizes_the_s3_pool_for_its_listeners() -> None:
    """botocore keeps 10 connections: beyond them every seek paid a new TCP connection."""
    from fsrecrypt.config import Config
    from fsrecrypt.store import build_store
    from fsrecrypt.web.server import S3_POOL_CAP, with_s3_pool_for_listeners

    s3 = with_overrides(
        Config(),
        storage={"backend": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:1"},
        playback={"max_connections": 300},
    )
    raised = with_s3_pool_for_listeners(s3)
    assert raised.storage.max_pool_connections == 300
    store = build_store(raised.storage)
    assert store.client.meta.config.max_pool_connections == 300  # type: ignore[attr-defined]
    big = with_overrides(s3, playback={"max_connections": 5000})
    assert with_s3_pool_for_listeners(big).storage.max_pool_connections == S3_POOL_CAP
    local = with_overrides(Config(), playback={"max_connections": 300})
    assert with_s3_pool_for_listeners(local).storage.max_pool_connections == 10
