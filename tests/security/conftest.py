"""Shared fixtures of the playback-server security tests (local store, two tenants)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fsrecrypt.web import create_app
from tests.web.test_web_app import World, build_world


@pytest.fixture(scope="module")
def web_world(pg_dsn, tmp_path_factory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("web-security"), pg_dsn, "local")
    yield w
    w.services.close()


@pytest.fixture
def web_client(web_world: World):
    app = create_app(web_world.services, now=web_world.now)
    app.testing = False
    web_world.clock[0] = 0.0
    return app.test_client()
