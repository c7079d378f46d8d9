"""The access log under hostile callers (issue 7, defects 6 and 7).

6: anonymous requests used to write one full row each (~64 KB with a long
User-Agent), and audit rows are never deleted. Refusals must still leave
evidence, counted per client, reason and minute, with every free-text field
bounded, and the hash chain intact.
7: a user of tenant B asking for tenant A's recording was logged only in B's
chain without the recording id; the owner must see the attempt too, while
the caller gets exactly the 404 of an unknown id.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.db import GENESIS_HASH, audit_row_hash
from tests.support.factories import write_config
from tests.web.test_web_app import World, assert_json_error, hdr

BIG_AGENT = "Mozilla/5.0 " + "A" * 60_000


def _fresh_address() -> str:
    """A client address no other test used, so its refusal buckets start empty."""
    n = uuid.uuid4().int
    return f"10.{n % 250 + 1}.{(n >> 8) % 250 + 1}.{(n >> 16) % 250 + 1}"


def _log_bytes_after(world: World, last_id: int) -> tuple[int, int]:
    with world.services.db.transaction() as cur:
        cur.execute(
            "SELECT count(*), coalesce(sum(pg_column_size(l.*)), 0)"
            " FROM recording_access_logs l WHERE id > %s",
            (last_id,),
        )
        rows, size = cur.fetchone()
    return int(rows), int(size)


def _last_id(world: World) -> int:
    with world.services.db.transaction() as cur:
        cur.execute("SELECT coalesce(max(id), 0) FROM recording_access_logs")
        return int(cur.fetchone()[0])


def test_anonymous_flood_adds_a_few_kb_and_is_counted(web_world: World, web_client) -> None:
    start = _last_id(web_world)
    ip = _fresh_address()
    for i in range(400):
        headers = {"User-Agent": BIG_AGENT}
        if i % 2:
            headers["X-API-Key"] = "fsr_0123456789abcdef_" + "x" * 43
        r = web_client.get("/v1/recordings", headers=headers, environ_base={"REMOTE_ADDR": ip})
        assert r.status_code == 401
    rows, size = _log_bytes_after(web_world, start)
    # one row per reason and minute (a minute boundary may split a bucket)
    assert rows <= 4, rows
    assert size <= 8 * 1024, size
    # every refusal is still counted
    buckets = web_world.services.db.refusal_buckets(ip)
    assert {(b["action"], b["reason"]) for b in buckets} == {
        ("auth", "missing API key"),
        ("auth", "invalid_api_key"),
    }
    assert sum(b["refusals"] for b in buckets) == 400
    assert all(b["first_log_id"] is not None for b in buckets)
    new = [r for r in web_world.services.db.audit_rows(action="auth") if r["id"] > start]
    assert new and all(len(r["user_agent"]) <= 512 for r in new)
    assert all(r["user_agent"].endswith("chars, truncated]") for r in new)
    assert all(r["details"]["aggregated"] for r in new)


def test_global_chain_links_through_aggregated_rows(web_world: World, web_client) -> None:
    start = _last_id(web_world)
    ip = {"REMOTE_ADDR": _fresh_address()}
    for _ in range(5):
        web_client.get("/v1/me", headers={"User-Agent": BIG_AGENT}, environ_base=ip)
        web_client.get(f"/v1/recordings/{uuid.uuid4()}/stream?kid=0&exp=1&sig=x", environ_base=ip)
    with web_world.services.db.transaction() as cur:
        cur.execute(
            "SELECT row_hash FROM recording_access_logs WHERE tenant_id IS NULL AND id <= %s"
            " ORDER BY id DESC LIMIT 1",
            (start,),
        )
        found = cur.fetchone()
        cur.execute(
            "SELECT * FROM recording_access_logs WHERE tenant_id IS NULL AND id > %s ORDER BY id",
            (start,),
        )
        names = [d[0] for d in cur.description]
        chain = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    # ten refusals of two kinds from one address: one chain row per kind (per minute)
    assert 2 <= len(chain) <= 4
    prev = found[0] if found else GENESIS_HASH
    for row in chain:
        assert row["prev_hash"] == prev
        assert audit_row_hash(row["prev_hash"], row) == row["row_hash"]
        prev = row["row_hash"]


def test_authenticated_free_text_is_bounded(web_world: World, web_client) -> None:
    rec = web_world.recordings["a1"]
    r = web_client.get(
        f"/v1/recordings/{rec.id}/stream",
        headers=hdr(web_world, **{"User-Agent": BIG_AGENT, "Range": "bytes=x" * 5000}),
    )
    assert_json_error(r, 416, "range_not_satisfiable")
    row = web_world.services.db.audit_rows(recording_id=rec.id, action="stream")[-1]
    assert len(row["user_agent"]) <= 512 and "truncated" in row["user_agent"]
    assert len(row["details"]["range_header"]) <= 100
    long_id = "z" * 5000
    r = web_client.get(
        f"/v1/recordings/{long_id}", headers=hdr(web_world, **{"User-Agent": "\x00ua"})
    )
    assert_json_error(r, 404, "not_found")
    assert len(r.get_json()["error"]["message"]) < 200
    row = web_world.services.db.audit_rows(tenant_id=rec.tenant_id, action="metadata")[-1]
    assert len(row["details"]["requested_id"]) <= 64


def test_cross_tenant_attempt_is_in_the_owners_export(
    web_world: World, web_client, tmp_path
) -> None:
    b1 = web_world.recordings["b1"]
    bodies = {}
    for suffix, action in (("", "metadata"), ("/stream", "stream"), ("/playback", "playback_url")):
        r = web_client.get(f"/v1/recordings/{b1.id}{suffix}", headers=hdr(web_world, "a"))
        body = assert_json_error(r, 404, "not_found")
        ghost = str(uuid.uuid4())
        unknown = web_client.get(f"/v1/recordings/{ghost}{suffix}", headers=hdr(web_world, "a"))
        ghost_body = assert_json_error(unknown, 404, "not_found")
        # no existence oracle: the same body apart from the id the caller sent
        assert body == {
            "error": {
                **ghost_body["error"],
                "message": ghost_body["error"]["message"].replace(ghost, b1.id),
            }
        }
        bodies[action] = body
    # the owner's export (tenant b) shows each attempt with the recording id
    cfg = write_config(tmp_path / "fsrecrypt.toml", web_world.services.config)
    out = tmp_path / "b.jsonl"
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    result = CliRunner().invoke(
        main,
        [
            "-c",
            str(cfg),
            "audit",
            "export",
            "--tenant",
            web_world.tenants["b"],
            "--from",
            since,
            "--output",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    attempts = [r for r in rows if r.get("recording_id") == b1.id and r.get("success") is False]
    assert {r["action"] for r in attempts} >= {"metadata", "stream", "playback_url"}
    a_tenant = web_world.recordings["a1"].tenant_id
    assert all(r["details"]["caller_tenant_id"] == a_tenant for r in attempts)
    assert all(r["user_id"] == "a-supervisor@example.com" for r in attempts)
    # the caller's chain keeps its own row, without the owner's recording id
    mine = [
        r
        for r in web_world.services.db.audit_rows(tenant_id=a_tenant)
        if r["details"].get("requested_id") == b1.id
    ]
    assert mine and all(r["recording_id"] is None for r in mine)
