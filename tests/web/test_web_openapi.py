"""The document and the code agree: routes, parameters and bodies come from one table.

The OpenAPI document is generated from ``fsrecrypt.web.routes.ROUTES`` and the
dataclasses of ``fsrecrypt.web.schemas``; these tests hold the app to it:
every URL rule is documented and every documented operation is served, a view
reads each parameter its route documents (and cannot read any other), and the
bodies the API sends have exactly the documented properties.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from flask import g

from fsrecrypt.web import create_api_key, create_app, openapi_document
from fsrecrypt.web.app import Params
from fsrecrypt.web.auth import ROLES
from fsrecrypt.web.routes import ROUTES
from tests.web.test_web_app import World, build_world, hdr

AUTOMATIC_METHODS = {"HEAD", "OPTIONS"}  # added by Flask/werkzeug to every GET rule


@pytest.fixture(scope="module")
def world(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(Path(tmp_path_factory.mktemp("web-openapi")), pg_dsn, "local")
    # One key holding every role, so each route's view runs.
    _row, w.keys["all"] = create_api_key(
        w.services, w.tenants["a"], "root@example.com", roles=ROLES
    )
    yield w
    w.services.close()


def _doc_path(rule: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


def test_every_url_rule_is_documented_and_every_operation_served(world: World) -> None:
    app = create_app(world.services, now=world.now)
    doc = openapi_document()
    served = set()
    for rule in app.url_map.iter_rules():
        path = _doc_path(rule.rule)
        for method in sorted((rule.methods or set()) - AUTOMATIC_METHODS):
            served.add((path, method.lower()))
            operation = doc["paths"].get(path, {}).get(method.lower())
            assert operation is not None, f"{method} {rule.rule} is served but not documented"
            documented = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert documented == set(rule.arguments), rule.rule
    documented_ops = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented_ops == served


def _values(world: World) -> dict[str, str]:
    """A valid value for every parameter name the document uses."""
    return {
        "id": world.recordings["a1"].id,
        "call_uuid": "call-a1",
        "from": "2000-01-01T00:00:00Z",
        "to": "2999-01-01T00:00:00Z",
        "limit": "10",
        "ttl": "60",
        "Range": "bytes=0-99",
    }


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.operation_id)
def test_each_documented_parameter_is_read_by_its_view(world: World, route: Any) -> None:
    app = create_app(world.services, now=world.now)
    read: list[set[str]] = []

    @app.after_request
    def record(response: Any) -> Any:
        read.append(set(g.params.read) if "params" in g else set())
        return response

    client = app.test_client()
    values = _values(world)
    if route.operation_id == "eraseRecording":  # the others keep a1
        values["id"] = world.recordings["a2"].id
    operation = openapi_document()["paths"][route.path][route.method.lower()]
    params = operation.get("parameters", [])
    path = route.path.replace("{id}", values["id"])
    query = {
        p["name"]: values[p["name"]] for p in params if p["in"] == "query" and p["name"] in values
    }
    headers = {
        p["name"]: values[p["name"]] for p in params if p["in"] == "header" and p["name"] in values
    }
    if route.security == "public":
        pass
    elif {"kid", "exp", "sig"} <= {p["name"] for p in params}:
        signed = client.get(f"/v1/recordings/{values['id']}/playback", headers=hdr(world))
        query.update(parse_qsl(urlsplit(signed.get_json()["url"]).query))
        read.clear()
    else:
        headers.update(hdr(world, "all"))
    body = {"reason": "case 42", "override_retention": True} if route.body else None
    if route.body and route.operation_id != "eraseRecording":
        body = {"reason": "case 42"}
    response = client.open(
        path, method=route.method, query_string=query, headers=headers, json=body
    )
    assert response.status_code < 400, response.data[:300]
    assert read == [{p["name"] for p in params}]


def test_a_view_cannot_read_an_undocumented_parameter(world: World) -> None:
    route = next(r for r in ROUTES if r.operation_id == "listRecordings")
    app = create_app(world.services, now=world.now)
    with app.test_request_context("/v1/recordings?limit=5&secret=1"):
        params = Params(route, {})
        assert params.integer("limit", default=100) == 5
        for read in (lambda: params.text("secret"), lambda: params.header("limit")):
            with pytest.raises(LookupError, match="not a declared"):
                read()
        assert params.read == {"limit"}


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["components"]["schemas"][name]


def _assert_matches(body: dict[str, Any], schema: dict[str, Any]) -> None:
    assert set(schema.get("required", [])) <= set(body) <= set(schema["properties"]), body


def test_bodies_have_exactly_the_documented_properties(world: World) -> None:
    doc = openapi_document()
    client = create_app(world.services, now=world.now).test_client()
    listing = client.get("/v1/recordings", headers=hdr(world)).get_json()
    _assert_matches(listing, _schema(doc, "RecordingList"))
    assert listing["recordings"]
    for recording in listing["recordings"]:
        _assert_matches(recording, _schema(doc, "Recording"))
        assert list(recording) == list(_schema(doc, "Recording")["properties"])
    _assert_matches(client.get("/v1/me", headers=hdr(world)).get_json(), _schema(doc, "Principal"))
    playback = client.get(
        f"/v1/recordings/{world.recordings['a1'].id}/playback", headers=hdr(world)
    )
    _assert_matches(playback.get_json(), _schema(doc, "PlaybackUrl"))
    error = client.get("/v1/me").get_json()
    _assert_matches(error, _schema(doc, "Error"))
    _assert_matches(error["error"], _schema(doc, "ErrorDetail"))
    assert "hint" in error["error"] and error["error"]["hint"] is not None
