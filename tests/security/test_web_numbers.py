"""Hostile numbers in every numeric parameter of the playback API (issue 7, defect 4).

``str.isdigit()`` accepts "²" (which ``int`` then refuses), ``int`` accepts
"٣" and refuses more than 4,300 digits: each turned a parameter into a 500
with no audit row, or into a value the caller never wrote. Every odd value
must be a 400 (or 416 for Range) with the usual JSON error and leave evidence
in the access log.
"""

from __future__ import annotations

import pytest

from fsrecrypt.numbers import NumberError, parse_int
from fsrecrypt.web import BadRange, parse_range
from tests.web.test_web_app import World, assert_json_error, hdr, stream_path

ODD = {
    "superscript": "\u00b2",
    "arabic_indic": "\u0663",
    "fullwidth": "\uff13",
    "5000_digits": "9" * 5000,
    "negative": "-1",
    "nul": "1\x00",
    "leading_space": " 1",
    "inner_tab": "1\t2",
    "plus": "+1",
    "underscore": "1_0",
}


def _audit_count(world: World, **filters) -> int:
    return len(world.services.db.audit_rows(**filters))


def _refusals(world: World, ip: str, action: str, reason: str) -> int:
    return sum(
        b["refusals"]
        for b in world.services.db.refusal_buckets(ip)
        if b["action"] == action and b["reason"] == reason
    )


@pytest.mark.parametrize("value", ODD.values(), ids=ODD.keys())
def test_odd_limit_is_400_and_audited(web_world: World, web_client, value: str) -> None:
    tenant = web_world.recordings["a1"].tenant_id
    before = _audit_count(web_world, tenant_id=tenant, action="list")
    r = web_client.get("/v1/recordings", query_string={"limit": value}, headers=hdr(web_world))
    assert_json_error(r, 400, "invalid_parameter")
    rows = web_world.services.db.audit_rows(tenant_id=tenant, action="list")
    assert len(rows) == before + 1
    assert rows[-1]["success"] is False and rows[-1]["error_message"] == "invalid_parameter"


@pytest.mark.parametrize("value", ODD.values(), ids=ODD.keys())
def test_odd_ttl_is_400_and_audited(web_world: World, web_client, value: str) -> None:
    rec = web_world.recordings["a1"]
    before = _audit_count(web_world, recording_id=rec.id, action="playback_url")
    r = web_client.get(
        f"/v1/recordings/{rec.id}/playback", query_string={"ttl": value}, headers=hdr(web_world)
    )
    assert_json_error(r, 400, "invalid_parameter")
    rows = web_world.services.db.audit_rows(recording_id=rec.id, action="playback_url")
    assert len(rows) == before + 1
    assert rows[-1]["success"] is False and rows[-1]["error_message"] == "invalid_parameter"


@pytest.mark.parametrize("value", ODD.values(), ids=ODD.keys())
def test_odd_signed_url_expiry_is_400_and_counted(web_world: World, web_client, value: str) -> None:
    rec = web_world.recordings["a1"]
    issued = web_client.get(f"/v1/recordings/{rec.id}/playback", headers=hdr(web_world))
    url = issued.get_json()["url"]
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    query["exp"] = value
    ip = f"10.77.{len(value) % 250}.{sum(map(ord, value[:50])) % 250 + 1}"
    before = _refusals(web_world, ip, "stream", "invalid_parameter")
    r = web_client.get(
        f"/v1/recordings/{rec.id}/stream", query_string=query, environ_base={"REMOTE_ADDR": ip}
    )
    assert_json_error(r, 400, "invalid_parameter")
    # anonymous refusals are counted (the first of each minute is also a chain row)
    assert _refusals(web_world, ip, "stream", "invalid_parameter") == before + 1
    rows = [
        row
        for row in web_world.services.db.audit_rows(action="stream")
        if row["error_message"] == "invalid_parameter" and str(row["ip_address"]) == ip
    ]
    assert rows and rows[-1]["user_id"] == "anonymous" and rows[-1]["success"] is False


RANGE_SHAPES = ("bytes={v}-", "bytes=0-{v}", "bytes=-{v}", "bytes={v}-{v}")
# Spaces inside a Range header are dropped (players send "bytes= 0-"), so a
# leading space is no odd number there; a tab is.
RANGE_ODD = {k: v for k, v in ODD.items() if k != "leading_space"}


@pytest.mark.parametrize("shape", RANGE_SHAPES)
@pytest.mark.parametrize("value", RANGE_ODD.values(), ids=RANGE_ODD.keys())
def test_odd_range_is_416_and_audited(web_world: World, web_client, value: str, shape: str) -> None:
    rec = web_world.recordings["a1"]
    header = shape.format(v=value)
    before = _audit_count(web_world, recording_id=rec.id, action="stream")
    r = web_client.get(stream_path(web_world, "a1"), headers=hdr(web_world, Range=header))
    assert_json_error(r, 416, "range_not_satisfiable")
    assert r.headers["Content-Range"] == f"bytes */{rec.file_size_bytes}"
    rows = web_world.services.db.audit_rows(recording_id=rec.id, action="stream")
    assert len(rows) == before + 1
    assert rows[-1]["error_message"] == "range_not_satisfiable"
    assert len(rows[-1]["details"]["range_header"]) <= 100


def test_4400_digit_range_is_416_not_500(web_world: World, web_client) -> None:
    r = web_client.get(
        stream_path(web_world, "a1"), headers=hdr(web_world, Range="bytes=0-" + "1" * 4400)
    )
    assert_json_error(r, 416, "range_not_satisfiable")


@pytest.mark.parametrize("value", RANGE_ODD.values(), ids=RANGE_ODD.keys())
def test_parse_range_refuses_odd_numbers(value: str) -> None:
    for shape in RANGE_SHAPES:
        header = shape.format(v=value)
        with pytest.raises(BadRange):
            parse_range(header, 1000)


@pytest.mark.parametrize("value", ODD.values(), ids=ODD.keys())
def test_parse_int_accepts_only_bounded_ascii(value: str) -> None:
    with pytest.raises(NumberError):
        parse_int(value)
    assert parse_int("0") == 0 and parse_int("9" * 19) == int("9" * 19)
    assert parse_int("-5", allow_negative=True) == -5
    with pytest.raises(NumberError):
        parse_int("9" * 20)
    with pytest.raises(NumberError):
        parse_int("7", maximum=6)
