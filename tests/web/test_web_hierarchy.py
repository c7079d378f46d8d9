"""``fsrecrypt serve`` (gevent's WSGI server, monkey-patched) plays recordings on branch keys.

The Material Providers Library's Hierarchical keyring runs inside the patched
process: full reads and Range requests over real HTTP return the recording's
bytes, through a branch key store on moto's DynamoDB and KMS.
"""

from __future__ import annotations

import http.client
from pathlib import Path

from tests.support.keystore import KeyStoreEnv
from tests.web.test_web_app import wav_bytes
from tests.web.test_web_server import ingest, make_setup, serve


def test_stream_and_ranges_through_branch_keys(
    pg_dsn: str, tmp_path: Path, key_store: KeyStoreEnv
) -> None:
    services, cfg, tenant, key = make_setup(tmp_path, pg_dsn, keys=key_store.keys_section())
    originals = [wav_bytes(1.0, seed=i) for i in range(3)]
    ids = [ingest(services, tmp_path, tenant, data) for data in originals]
    assert services.db.recording(ids[0]).encryption_metadata["key_provider"] == (
        "aws-kms-hierarchy"
    )
    with serve(cfg, tmp_path / "serve.log") as base:
        port = int(base.rsplit(":", 1)[1])
        for rid, original in zip(ids, originals, strict=True):
            for range_header, start, end in ((None, 0, None), ("bytes=100-4999", 100, 5000)):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                headers = {"X-API-Key": key}
                if range_header:
                    headers["Range"] = range_header
                conn.request("GET", f"/v1/recordings/{rid}/stream", headers=headers)
                resp = conn.getresponse()
                assert resp.status == (206 if range_header else 200)
                assert resp.read() == original[start:end]
                conn.close()
    services.close()
