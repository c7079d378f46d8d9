"""The daemon (a gevent-patched subprocess) on branch keys, with KMS and DynamoDB cut off.

The key store's endpoint goes through a TCP proxy that can go dark (refusing
and cutting connections) while moto keeps its tables and keys; objects go to
the local store, which stays up. Within the cache TTL an outage is invisible:
100 recordings arriving over 30 s are all stored, none failed an attempt and
none waited for KMS. Past the TTL the daemon's existing retry path takes
over: recordings stay pending with their plaintext and are stored once the
network is back, nothing lost.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonEnv, make_env
from tests.support.keystore import KeyStoreEnv
from tests.support.tcpproxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def hierarchy_env(tmp_path: Path, key_store: KeyStoreEnv) -> Iterator[DaemonEnv]:
    yield from make_env(tmp_path, key_store=key_store)


def metric(env: DaemonEnv, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _proxied(env: DaemonEnv) -> tuple[TcpProxy, dict[str, Any]]:
    moto_port = int(env.keys["endpoint_url"].rsplit(":", 1)[1])
    proxy = TcpProxy(moto_port)
    proxy.up()
    return proxy, {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}


def test_kms_unreachable_for_30s_while_100_recordings_arrive(hierarchy_env: DaemonEnv) -> None:
    env = hierarchy_env
    proxy, keys = _proxied(env)
    try:
        d = env.start(keys=keys)
        first, first_data = env.write_wav()
        env.emit_stop(first)
        assert env.decrypt(env.wait_status(first, "stored")) == first_data

        proxy.down()
        emitted: dict[Path, tuple[float, bytes]] = {}
        t0 = time.monotonic()
        for i in range(100):
            path, data = env.write_wav(seconds=0.5)
            emitted[path] = (time.time(), data)
            env.emit_stop(path)
            time.sleep(max(0.0, t0 + (i + 1) * 0.3 - time.monotonic()))
        rows = {}
        for path in emitted:
            rows[path] = env.wait_status(path, "stored", timeout=60)
        outage = time.monotonic() - t0
        assert outage >= 29, f"the outage lasted {outage:.1f}s"
        assert d.alive()
        latencies = sorted(rows[p].stored_at.timestamp() - emitted[p][0] for p in emitted)
        # None needed KMS: any call would have failed (the proxy refuses), costing an
        # attempt and a retry; none did. The latency bound only keeps that honest on a
        # loaded machine (a connect timeout alone is 3 s, botocore retries it).
        assert all(r.attempts == 0 and r.last_error is None for r in rows.values())
        assert metric(env, "fsrecrypt_retries_total") == 0
        assert latencies[-1] < 10.0, latencies[-10:]
        for path, (_t, data) in list(emitted.items())[::10]:
            assert env.decrypt(rows[path]) == data
    finally:
        proxy.down()


def test_an_outage_longer_than_the_ttl_retries_and_loses_nothing(
    hierarchy_env: DaemonEnv,
) -> None:
    env = hierarchy_env
    proxy, keys = _proxied(env)
    try:
        d = env.start(
            keys={**keys, "cache_ttl": 2},
            pipeline={"max_attempts": 30, "retry_base": 0.5, "retry_cap": 2.0},
        )
        first, first_data = env.write_wav()
        env.emit_stop(first)
        assert env.decrypt(env.wait_status(first, "stored")) == first_data

        proxy.down()
        time.sleep(3)  # the cached branch key expires
        during = []
        for _ in range(5):
            path, data = env.write_wav(seconds=0.5)
            env.emit_stop(path)
            during.append((path, data))

        # Every recording failed at least once (not just five retries in all: with
        # four workers, one recording could fail twice before the fifth started).
        def each_failed_once() -> bool:
            rows = [env.rows(path) for path, _ in during]
            return all(rs and all(r.attempts >= 1 for r in rs) for rs in rows)

        env.wait(each_failed_once, 60, "every recording to have failed once")
        env.wait(lambda: metric(env, "fsrecrypt_retries_total") >= 5, 10, "retries")
        for path, _ in during:
            assert path.exists(), "plaintext must stay while the key store is unreachable"
            assert all(r.status == "pending" for r in env.rows(path))
        assert d.alive()
        proxy.up()
        for path, data in during:
            row = env.wait_status(path, "stored", timeout=90)
            assert row.attempts >= 1
            assert env.decrypt(row) == data
            env.wait(lambda p=path: not p.exists(), 10, "plaintext removal")
        assert d.alive()
    finally:
        proxy.down()
