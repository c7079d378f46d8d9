"""Masked spans in the API: the recording JSON carries them as the OpenAPI document says."""

from __future__ import annotations

import json
import uuid

from fsrecrypt.web import create_app, openapi_document
from tests.web.test_web_app import World, build_world, hdr


def _check(schema: dict, value: object, doc: dict) -> None:
    """A tiny structural check of ``value`` against one OpenAPI 3.0 schema (what we use)."""
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if value is None:
        assert schema.get("nullable"), schema
        return
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict)
        assert set(schema.get("required", [])) <= set(value), (schema, value)
        for name, item in value.items():
            _check(schema["properties"][name], item, doc)
    elif kind == "array":
        assert isinstance(value, list)
        for item in value:
            _check(schema["items"], item, doc)
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool)
    elif kind == "boolean":
        assert isinstance(value, bool)
    elif kind == "string":
        assert isinstance(value, str)
        if "enum" in schema:
            assert value in schema["enum"]


def test_recording_json_carries_masked_spans_and_verdict(pg_dsn: str, tmp_path) -> None:
    world: World = build_world(tmp_path, pg_dsn, "local")
    try:
        spans = [
            {
                "announced_start_ms": 980,
                "announced_end_ms": 2980,
                "open_at_stop": False,
                "via": "dialplan",
                "start_ms": 1000,
                "end_ms": 3000,
                "silent": True,
            },
            {
                "announced_start_ms": 3100,
                "announced_end_ms": None,
                "open_at_stop": True,
                "via": "api",
                "start_ms": None,
                "end_ms": None,
                "silent": False,
            },
            {"announced_start_ms": "x", "via": "<script>", "silent": "yes"},  # damaged row
        ]
        rec = world.recordings["a1"]
        with world.services.db.transaction("test") as cur:
            cur.execute(
                "UPDATE call_recordings SET mask_spans = %s::jsonb, mask_verified = false"
                " WHERE id = %s",
                (json.dumps(spans), rec.id),
            )
        client = create_app(world.services, now=world.now).test_client()
        body = client.get(f"/v1/recordings/{rec.id}", headers=hdr(world)).get_json()
        assert body["mask_verified"] is False
        assert body["masked_spans"] == [
            {
                "announced_start_ms": 980,
                "announced_end_ms": 2980,
                "start_ms": 1000,
                "end_ms": 3000,
                "silent": True,
                "via": "dialplan",
            },
            {
                "announced_start_ms": 3100,
                "announced_end_ms": None,
                "start_ms": None,
                "end_ms": None,
                "silent": False,
                "via": "api",
            },
            {
                "announced_start_ms": 0,
                "announced_end_ms": None,
                "start_ms": None,
                "end_ms": None,
                "silent": False,
                "via": "dialplan",
            },
        ]
        doc = openapi_document()
        _check({"$ref": "#/components/schemas/Recording"}, body, doc)
        listed = client.get("/v1/recordings", headers=hdr(world)).get_json()["recordings"]
        other = next(r for r in listed if r["id"] == world.recordings["a2"].id)
        assert other["mask_verified"] is None and other["masked_spans"] == []
        _check({"$ref": "#/components/schemas/RecordingList"}, {"recordings": listed}, doc)
        assert client.get(f"/v1/recordings/{uuid.uuid4()}", headers=hdr(world)).status_code == 404
    finally:
        world.services.close()
