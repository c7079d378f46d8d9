"""`fsrecrypt serve` as a child process on a free loopback port, for tests."""

from __future__ import annotations

import http.client
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.moto import free_port


def _answers(port: int, tls: bool = False) -> bool:
    try:
        if tls:
            unverified = ssl._create_unverified_context()  # only: is it up yet?
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", port, timeout=2, context=unverified
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/v1/openapi.json")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


@contextmanager
def serve_process(
    config_path: Path,
    log_path: Path,
    *,
    preexec_fn: Callable[[], None] | None = None,
    tls: bool = False,
) -> Iterator[tuple[int, int]]:
    """Start `fsrecrypt serve`, wait until it answers, yield (port, pid); SIGTERM on exit.

    ``tls``: the server speaks HTTPS ([playback] tls_cert_file); readiness is probed so.
    """
    port = free_port()
    env = {**os.environ, "FSRECRYPT_CONFIG": str(config_path)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from fsrecrypt.cli import main; main()",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=preexec_fn,
        )
    try:
        deadline = time.monotonic() + 30
        while not _answers(port, tls):
            if proc.poll() is not None:
                pytest.fail(f"serve exited ({proc.returncode}):\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve did not answer:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
