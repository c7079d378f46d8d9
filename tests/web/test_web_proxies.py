"""Behind a reverse proxy: ``X-Forwarded-For``/``-Proto`` believed from trusted proxies only.

The access log must name the person, not the proxy, and must never name an
address a client wrote into a header itself. Both directions are tested
through the app (the audit row's ``ip_address``, the signed URL's scheme,
HSTS), and the header walk is tested with hostile values: garbage, huge
headers, IPv6 (bracketed, mapped), many hops.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsrecrypt import pipeline
from fsrecrypt.config import with_overrides
from fsrecrypt.web import create_app
from fsrecrypt.web.proxies import MAX_HOPS, TrustedProxies, parse_ip
from tests.web.test_web_app import World, build_world, hdr

TRUSTED = ("10.0.0.0/8", "fd00::/8")


@pytest.fixture(scope="module")
def world(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(Path(tmp_path_factory.mktemp("web-proxies")), pg_dsn, "local")
    yield w
    w.services.close()


@pytest.fixture(scope="module")
def proxied(world: World) -> Iterator[pipeline.Services]:
    config = with_overrides(world.services.config, playback={"trusted_proxies": TRUSTED})
    services = pipeline.Services(config)
    yield services
    services.close()


def playback_as(world: World, services: pipeline.Services, peer: str, **headers: str):
    client = create_app(services, now=world.now).test_client()
    rid = world.recordings["a1"].id
    response = client.get(
        f"/v1/recordings/{rid}/playback",
        headers=hdr(world, **headers),
        environ_base={"REMOTE_ADDR": peer},
    )
    assert response.status_code == 200, response.data[:300]
    row = world.services.db.audit_rows(recording_id=rid, action="playback_url")[-1]
    return response, str(row["ip_address"])


def test_a_trusted_proxy_names_the_client(world: World, proxied: pipeline.Services) -> None:
    response, ip = playback_as(
        world,
        proxied,
        "10.1.2.3",
        **{"X-Forwarded-For": "198.51.100.7, 10.9.9.9", "X-Forwarded-Proto": "https"},
    )
    assert ip == "198.51.100.7"
    url = response.get_json()["url"]
    assert url.startswith("https://localhost/v1/recordings/")
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")


def test_anyone_else_cannot_forge_the_address_or_scheme(
    world: World, proxied: pipeline.Services
) -> None:
    forged = {"X-Forwarded-For": "203.0.113.66", "X-Forwarded-Proto": "https"}
    response, ip = playback_as(world, proxied, "192.0.2.10", **forged)
    assert ip == "192.0.2.10"
    assert response.get_json()["url"].startswith("/v1/recordings/")
    assert "Strict-Transport-Security" not in response.headers
    # and with no trusted proxies configured, nobody is believed (the default)
    response, ip = playback_as(world, world.services, "10.1.2.3", **forged)
    assert ip == "10.1.2.3" and "Strict-Transport-Security" not in response.headers


def test_a_client_cannot_hide_behind_a_left_most_hop(
    world: World, proxied: pipeline.Services
) -> None:
    # The client wrote "1.1.1.1, 10.0.0.5" itself; the trusted proxy appended what it saw.
    _r, ip = playback_as(
        world, proxied, "10.1.2.3", **{"X-Forwarded-For": "1.1.1.1, 10.0.0.5, 198.51.100.8"}
    )
    assert ip == "198.51.100.8"
    # a hostile value never breaks the request: garbage, huge, control characters
    for value in ("not-an-ip", "1.2.3.4\x00", ", , ,", "x" * 100_000, "1.2.3.4:8080"):
        _r, ip = playback_as(world, proxied, "10.1.2.3", **{"X-Forwarded-For": value})
        assert ip == "10.1.2.3"  # nothing believable: the proxy itself
    _r, ip = playback_as(world, proxied, "10.1.2.3", **{"X-Forwarded-Proto": "gopher"})
    assert ip == "10.1.2.3"


def _walk(forwarded_for: str, peer: str = "10.0.0.1") -> str:
    proxies = TrustedProxies(lambda e, s: [], TRUSTED)
    return str(proxies.client(parse_ip(peer), forwarded_for))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("forwarded_for", "client"),
    [
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::2]", "2001:db8::2"),
        ("2001:db8::3, fd00::1", "2001:db8::3"),
        ("::ffff:198.51.100.9", "198.51.100.9"),  # IPv4-mapped: the v4 address
        ("::ffff:10.0.0.7, 198.51.100.1", "198.51.100.1"),
        ("198.51.100.2, garbage, 10.0.0.2", "10.0.0.2"),  # the walk stops at garbage
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("", "10.0.0.1"),
    ],
)
def test_the_walk_with_ipv6_and_garbage(forwarded_for: str, client: str) -> None:
    assert _walk(forwarded_for) == client


def test_many_hops_are_bounded() -> None:
    # 10 000 trusted hops after the client: only the last MAX_HOPS are read, and the
    # answer is then the left-most trusted hop read (never an address further left).
    hops = ["198.51.100.50"] + [f"10.0.{i // 250}.{i % 250}" for i in range(10_000)]
    got = ipaddress.ip_address(_walk(", ".join(hops)))
    assert got in ipaddress.ip_network("10.0.0.0/8")
    short = ["198.51.100.51", *hops[-(MAX_HOPS - 1) :]]
    assert _walk(", ".join(short)) == "198.51.100.51"


def test_config_refuses_a_bad_cidr(tmp_path: Path) -> None:
    from fsrecrypt.config import Config
    from fsrecrypt.errors import ConfigError

    with pytest.raises(ConfigError, match="trusted_proxies"):
        with_overrides(Config(), playback={"trusted_proxies": ("10.0.0.0/8", "nonsense")})
