"""What a backfill takes from a name (pure): hostile names must not become calls or tenants."""

from __future__ import annotations

import json

import pytest

from fsrecrypt.backfill.naming import Naming, media_type, parse_source
from fsrecrypt.backfill.sources import SourceItem, named_item
from fsrecrypt.errors import ConfigError

UUID = "0b5e9f1c-2d3a-4e5f-8a9b-0c1d2e3f4a5b"


def test_default_call_uuid_is_the_first_uuid_of_the_base_name() -> None:
    naming = Naming(tenant="acme")
    assert naming.call_uuid_for(f"{UUID.upper()}/x_{UUID}.wav") == UUID
    # A directory named like a UUID is not the call's.
    assert naming.call_uuid_for(f"{UUID}/recording.wav") is None


@pytest.mark.parametrize(
    "name",
    [
        "call-\u0661\u0662\u0663.wav",  # Arabic-Indic digits
        "call-\uff11\uff12\uff13.wav",  # full-width digits
        "call-\U0001d7d9\U0001d7da.wav",  # mathematical digits
    ],
)
def test_unicode_digits_are_not_digits(name: str) -> None:
    naming = Naming(tenant="acme", call_uuid_from=r"call-(\d+)")
    assert naming.call_uuid_for(name) is None
    assert Naming(tenant="acme").call_uuid_for(name.replace("call-", "\uff10" * 8)) is None


def test_a_call_uuid_must_be_plain_text() -> None:
    naming = Naming(tenant="acme", call_uuid_from=r"call-(?P<call>[^.]+)")
    assert naming.call_uuid_for("call-abc_1.wav") == "abc_1"
    assert naming.call_uuid_for("call-a b.wav") is None
    assert naming.call_uuid_for("call-" + "a" * 200 + ".wav") is None
    assert naming.call_uuid_for("call-x\u200by.wav") is None  # zero-width space


def test_tenant_from_needs_a_named_group_and_a_valid_name() -> None:
    with pytest.raises(ConfigError, match="no \\(\\?P<tenant>"):
        Naming(tenant_from=r"^([^/]+)/").validate()
    with pytest.raises(ConfigError, match="exactly one"):
        Naming(tenant="a", tenant_from=r"(?P<tenant>x)").validate()
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        Naming(tenant="a", call_uuid_from="(").validate()
    naming = Naming(tenant_from=r"^(?P<tenant>[^/]+)/")
    naming.validate()
    assert naming.tenant_for("acme/x.wav") == "acme"
    assert naming.tenant_for("-evil/x.wav") is None
    assert naming.tenant_for("\uff41cme/x.wav") is None  # full-width letters


def test_media_type_needs_extension_and_content_to_agree() -> None:
    assert media_type("x.mp3", b"ID3\x04rest")[0] == "audio/mpeg"
    assert media_type("x.opus", b"OggS\x00")[0] == "audio/opus"
    assert media_type("x.flac", b"fLaC")[0] == "audio/flac"
    assert media_type("x.MP3", b"\xff\xfb\x90")[0] == "audio/mpeg"
    assert media_type("x.mp3", b"%PDF-1.7")[0] is None
    assert media_type("x.wav", b"not a riff")[0] is None
    assert media_type("x.bin", b"RIFF\x00\x00\x00\x00WAVE")[0] == "audio/wav"
    assert media_type("x.txt", b"hello")[0] is None


def test_sources_are_directories_or_s3_urls() -> None:
    assert parse_source("s3://my-bucket/a/b").prefix == "a/b"
    assert parse_source("/srv/rec/../rec2").root == "/srv/rec2"
    for bad in ("s3://Bad_Bucket/x", "https://example.com/x", "s3://", "/x\0y"):
        with pytest.raises(ConfigError):
            parse_source(bad)


def test_unstorable_names_become_skipped_items_that_fit_jsonb() -> None:
    naming = Naming(tenant="acme")
    for name in ("a\x00b.wav", "bad-\udcff.wav"):
        item = named_item("s3", "bucket", name, name, naming)
        assert item.skip is not None
        payload = json.dumps(item.payload(), ensure_ascii=False)
        assert "\x00" not in payload and "\\u0000" not in payload
        payload.encode("utf-8")  # no lone surrogate left
        assert SourceItem.from_payload(json.loads(payload)).skip == item.skip
