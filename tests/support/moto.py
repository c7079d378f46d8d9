"""A real moto server, in its own process, for the S3, KMS and DynamoDB tests.

Why a separate process and not ``mock_aws``: the code under test must talk to
an endpoint over HTTP exactly as it talks to AWS (botocore's retries,
timeouts, checksums and error parsing all run), and a server in another
process cannot be bypassed by accident through patched clients. It is never
skipped: if it cannot start, the session fails with the server's stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REGION = "us-east-1"
_STARTUP_TIMEOUT = 30.0

_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    # Never pick up a developer's real profile or IMDS by accident.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    """Handle on the running server; ``reset()`` wipes every bucket and key."""

    endpoint_url: str
    region: str
    process: subprocess.Popen[bytes]
    stderr_path: Path

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def client(self, service: str) -> Any:
        """A boto3 client pointed at this server (for test setup and checks)."""
        import boto3

        return boto3.client(service, region_name=self.region, endpoint_url=self.endpoint_url)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def _wait_until_up(server: MotoServer) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"moto server exited with code {server.process.returncode} at start:\n"
                f"{server.stderr()}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(
                f"{server.endpoint_url}/moto-api/data.json", timeout=2
            ) as resp:
                json.loads(resp.read() or b"{}")
                return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
            time.sleep(0.1)
    server.process.kill()
    pytest.fail(
        f"moto server did not answer within {_STARTUP_TIMEOUT:.0f}s ({last!r}):\n{server.stderr()}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """Start ``python -m moto.server`` on a free loopback port for the whole session."""
    saved = {k: os.environ.get(k) for k in _DUMMY_ENV}
    os.environ.update(_DUMMY_ENV)
    port = free_port()
    tmpdir = Path(tempfile.mkdtemp(prefix="fsrecrypt-moto-"))
    stderr_path = tmpdir / "moto.stderr"
    env = {**os.environ, **_DUMMY_ENV}
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    server = MotoServer(
        endpoint_url=f"http://127.0.0.1:{port}",
        region=REGION,
        process=proc,
        stderr_path=stderr_path,
    )
    try:
        _wait_until_up(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class Bucket:
    name: str
    endpoint_url: str
    region: str
    client: Any


def _make_bucket(moto_server: MotoServer, *, versioning: bool) -> Bucket:
    s3 = moto_server.client("s3")
    name = f"fsrecrypt-test-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    if versioning:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return Bucket(
        name=name, endpoint_url=moto_server.endpoint_url, region=moto_server.region, client=s3
    )


@pytest.fixture
def s3_bucket(moto_server: MotoServer, request: pytest.FixtureRequest) -> Bucket:
    """A fresh, empty bucket per test; ``@pytest.mark.parametrize('s3_bucket',
    [{'versioning': True}], indirect=True)`` turns versioning on."""
    param = getattr(request, "param", None) or {}
    return _make_bucket(moto_server, versioning=bool(param.get("versioning", False)))


@pytest.fixture
def versioned_s3_bucket(moto_server: MotoServer) -> Bucket:
    """A fresh bucket with versioning enabled."""
    return _make_bucket(moto_server, versioning=True)


@pytest.fixture
def kms_key(moto_server: MotoServer) -> str:
    """A fresh symmetric KMS key; returns its ARN."""
    kms = moto_server.client("kms")
    meta = kms.create_key(Description="fsrecrypt test key")["KeyMetadata"]
    return str(meta["Arn"])
