"""Branch keys through the real pipeline: KMS leaves the per-recording path.

Counted with boto3 event hooks on the KMS client the key stores use: 500
recordings stored and 500 played back across two tenants cost at most two KMS
calls per tenant (the active branch key for wrapping, its version for
unwrapping) within one cache TTL; with ``aws-kms`` the same work costs one
call per recording and one per playback. Every playback is still a row in
fsrecrypt's own audit chain.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fsrecrypt.pipeline import (
    Services,
    add_branch_key_tenant,
    fetch_recording,
    ingest_file,
)
from tests.support.factories import local_config, make_wav, unique

pytestmark = pytest.mark.integration


class KmsCalls:
    """Every KMS request through one boto3 client: operation and branch key id (from the
    encryption context the key store sends)."""

    def __init__(self, client: Any) -> None:
        self.calls: list[tuple[str, str | None]] = []
        client.meta.events.register("provide-client-params.kms.*", self._seen)

    def _seen(self, params: dict[str, Any], model: Any, **_kw: Any) -> None:
        context = params.get("EncryptionContext") or params.get("SourceEncryptionContext") or {}
        self.calls.append((model.name, context.get("branch-key-id")))

    def per_branch(self) -> Counter[str | None]:
        return Counter(branch for _op, branch in self.calls)


@pytest.fixture
def hierarchy_config(tmp_path: Path, pg_dsn: str, key_store):
    return local_config(tmp_path, pg_dsn, keys=key_store.keys_section())


def test_500_recordings_and_500_playbacks_cost_at_most_2_kms_calls_per_tenant(
    hierarchy_config, tmp_path: Path
) -> None:
    admin = Services(hierarchy_config)
    tenants = [add_branch_key_tenant(admin, unique("tenant"), "new") for _ in range(2)]
    admin.close()
    recordings = tmp_path / "recordings"

    services = Services(hierarchy_config)  # a fresh process's view: nothing cached yet
    kms = KmsCalls(services.keys.kms_client)
    stored: list[tuple[str, bytes]] = []
    try:
        for i in range(500):
            tenant = tenants[i % 2]
            wav = recordings / f"r{i:03d}.wav"
            data = make_wav(wav, 0.02, seed=i)
            outcome = ingest_file(services, str(wav), tenant.name, user_id="test")
            stored.append((outcome.recording.id, data))
        for rec_id, data in stored:
            out = io.BytesIO()
            fetch_recording(services, rec_id, out, user_id="listener")
            assert out.getvalue() == data
        per_branch = kms.per_branch()
        assert set(per_branch) <= {t.kms_key_id for t in tenants}, kms.calls
        for tenant in tenants:
            assert 1 <= per_branch[tenant.kms_key_id] <= 2, kms.calls
        assert all(op == "Decrypt" for op, _ in kms.calls), kms.calls
        # fsrecrypt's own audit chain still records every playback
        for rec_id, _data in stored[:50]:
            rows = services.db.audit_rows(recording_id=rec_id)
            assert [r["action"] for r in rows if r["user_id"] == "listener"] == ["download"]
        row = services.db.recording(stored[0][0])
        assert row.kms_key_id == tenants[0].kms_key_id
        assert row.encryption_metadata.get("key_provider") == "aws-kms-hierarchy"
    finally:
        services.close()


def test_the_cache_ttl_is_honoured(hierarchy_config, key_store, tmp_path: Path) -> None:
    """Past the TTL the branch key is fetched again: KMS still decides, once per TTL."""
    import time

    from fsrecrypt.config import with_overrides

    config = with_overrides(hierarchy_config, keys={"cache_ttl": 8})  # room for a loaded machine
    admin = Services(config)
    tenant = add_branch_key_tenant(admin, unique("tenant"), "new")
    admin.close()
    services = Services(config)
    kms = KmsCalls(services.keys.kms_client)
    try:
        for i in range(3):
            wav = tmp_path / "recordings" / f"ttl{i}.wav"
            make_wav(wav, 0.02, seed=i)
            ingest_file(services, str(wav), tenant.name)
        assert len(kms.calls) == 1
        time.sleep(8.5)
        wav = tmp_path / "recordings" / "ttl-late.wav"
        make_wav(wav, 0.02, seed=9)
        ingest_file(services, str(wav), tenant.name)
        assert len(kms.calls) == 2
    finally:
        services.close()
