"""The daemon under test as a real subprocess, with everything it talks to real too.

``daemon_env`` gives a test: a fresh migrated database of its own (so one
test's pending rows are never resumed by another test's daemon), a local
keyring with a tenant key, a recordings directory, a local object store (or
moto S3/KMS), and the replaying ESL server as a separate process
(``python -m tests.support.eslserver``). ``DaemonEnv.start()`` writes a
config file and runs ``fsrecrypt -c CONFIG run`` as a child process whose
stdout (JSON log lines) goes to a file the test can read.

Nothing here is mocked: the daemon opens real sockets to the ESL server,
PostgreSQL and moto, and writes and deletes real files.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.eslserver import EslServerProcess
from tests.support.moto import free_port
from tests.support.pg import create_database, drop_database, ensure_postgres

ROOT = Path(__file__).resolve().parents[2]


def wav_bytes(seconds: float, *, channels: int = 1, rate: int = 8000, seed: bytes = b"") -> bytes:
    """A complete 16-bit PCM WAV with random samples (so a wrong decrypt cannot pass)."""
    data = os.urandom(int(seconds * rate) * 2 * channels)
    byte_rate = rate * 2 * channels
    fmt = struct.pack("<HHIIHH", 1, channels, rate, byte_rate, 2 * channels, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


class DaemonProcess:
    """One ``fsrecrypt run`` child process."""

    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        env: dict[str, str],
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [
                *prefix,  # e.g. setpriv: run the daemon as another user
                sys.executable,
                "-c",
                "from fsrecrypt.cli import main; main()",
                "-c",
                str(config_path),
                "run",
            ],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 60.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def rss_kib(self) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0


@dataclass
class DaemonEnv:
    """Everything one daemon test needs; see the module doc."""

    tmp: Path
    dsn: str
    esl: EslServerProcess
    tenant: str
    key_id: str
    recordings: Path
    storage: dict[str, Any]
    keys: dict[str, Any]
    extra_env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 0
    daemons: list[DaemonProcess] = field(default_factory=list)
    _services: Any = None

    # --- configuration -----------------------------------------------------------

    def config_sections(self, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {
            "freeswitch": {
                "host": "127.0.0.1",
                "port": self.esl.port,
                "password": "ClueCon",
                "recordings_dirs": [str(self.recordings)],
                "default_tenant": self.tenant,
                "connect_timeout": 2.0,
                "command_timeout": 2.0,
                "liveness_interval": 1.0,
                "backoff_cap": 2.0,
            },
            "database": {"dsn": self.dsn, "connect_timeout": 2.0},
            "keys": dict(self.keys),
            "storage": dict(self.storage),
            "pipeline": {
                "concurrency": 4,
                "max_attempts": 8,
                "retry_base": 0.2,
                "retry_cap": 2.0,
                "sweep_interval": 1.0,
                "quiet_period": 1.0,
                "shutdown_grace": 10.0,
            },
            "metrics": {
                "listen": f"127.0.0.1:{self.metrics_port}",
                "heartbeat_file": str(self.tmp / "run" / "heartbeat"),
            },
            "logging": {"level": "info", "format": "json"},
        }
        for name, values in overrides.items():
            sections.setdefault(name, {}).update(values)
        return sections

    def write_config(self, **overrides: dict[str, Any]) -> Path:
        path = self.tmp / "fsrecrypt.toml"
        write_toml(path, self.config_sections(**overrides))
        return path

    def config(self, **overrides: dict[str, Any]) -> Any:
        from fsrecrypt.config import load_config

        return load_config(self.write_config(**overrides))

    def services(self) -> Any:
        """Services for the test's own checks (same database, keys, store as the daemon)."""
        if self._services is None:
            from fsrecrypt.pipeline import Services

            self._services = Services(self.config())
        return self._services

    # --- the daemon ----------------------------------------------------------------

    def start(
        self, wait_ready: bool = True, prefix: tuple[str, ...] = (), **overrides: dict[str, Any]
    ) -> DaemonProcess:
        path = self.write_config(**overrides)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        env.update(self.extra_env, PYTHONUNBUFFERED="1")
        d = DaemonProcess(path, self.tmp / "daemon.log", env, prefix)
        self.daemons.append(d)
        if wait_ready:
            assert self.esl.call("wait_subscribed", n=1, timeout=30.0), self.log_tail()
        return d

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        try:
            text = (self.tmp / "daemon.log").read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "<raw>", "line": line})
        return out

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = (self.tmp / "daemon.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(lines[-n:])

    # --- recordings ------------------------------------------------------------------

    def write_wav(
        self,
        name: str | None = None,
        seconds: float = 1.0,
        channels: int = 1,
        mtime_ago: float = 0.0,
        directory: Path | None = None,
    ) -> tuple[Path, bytes]:
        path = (directory or self.recordings) / (name or f"{uuid.uuid4()}.wav")
        data = wav_bytes(seconds, channels=channels)
        path.write_bytes(data)
        if mtime_ago:
            t = time.time() - mtime_ago
            os.utime(path, (t, t))
        return path, data

    def emit_stop(
        self, path: str | Path, fixture: str = "record_stop.esl", **overrides: str | None
    ) -> int:
        """Send a RECORD_STOP fixture with its path (and any header) rewritten."""
        headers: dict[str, str | None] = {
            "Record-File-Path": str(path),
            "Channel-Call-UUID": str(uuid.uuid4()),
        }
        headers.update(overrides)
        return int(self.esl.call("emit_fixture", name=fixture, overrides=headers))

    def rows(self, path: str | Path | None = None) -> list[Any]:
        db = self.services().db
        return db.recordings(source_path=str(path) if path is not None else None)

    def wait(
        self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n--- daemon log ---\n{self.log_tail()}")

    def wait_status(self, path: str | Path, status: str, timeout: float = 30.0) -> Any:
        def done() -> bool:
            return any(r.status == status for r in self.rows(path))

        self.wait(done, timeout, f"{path} to be {status}")
        return next(r for r in self.rows(path) if r.status == status)

    def decrypt(self, recording: Any) -> bytes:
        from fsrecrypt.pipeline import iter_plaintext, open_recording

        s = self.services()
        opened = open_recording(s, s.db.recording(recording.id))
        return b"".join(iter_plaintext(s, opened))

    def close(self) -> None:
        for d in self.daemons:
            if d.alive():
                d.kill9()
        if self._services is not None:
            self._services.close()


def _new_db() -> tuple[str, str]:
    from fsrecrypt import db

    ensure_postgres()
    name = f"fsrecrypt_test_{uuid.uuid4().hex[:12]}"
    dsn = create_database(name)
    db.migrate(dsn)
    return name, dsn


def _aws_env() -> dict[str, str]:
    return {
        k: os.environ[k]
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_EC2_METADATA_DISABLED",
        )
        if k in os.environ
    }


def make_env(tmp: Path, *, s3: Any = None, key_store: Any = None) -> Iterator[DaemonEnv]:
    """Build a DaemonEnv (local store and keyring, or moto S3 + KMS when ``s3`` is given).

    ``key_store`` (a ``tests.support.keystore.KeyStoreEnv``) makes the tenant's
    key a new branch key in that store (``aws-kms-hierarchy``), whatever the store.
    """
    name, dsn = _new_db()
    esl = EslServerProcess()
    recordings = tmp / "recordings"
    recordings.mkdir()
    tenant = f"t{uuid.uuid4().hex[:8]}"
    extra_env: dict[str, str] = {}
    if s3 is None:
        from fsrecrypt.keys import LocalKeyring

        keyring = tmp / "keyring.json"
        key_id = "tenant-key"
        LocalKeyring(keyring).create_key(key_id)
        keys: dict[str, Any] = {"provider": "local", "keyring": str(keyring)}
        storage: dict[str, Any] = {"backend": "local", "path": str(tmp / "objects")}
        (tmp / "objects").mkdir()
    else:
        moto_server, bucket = s3
        kms = moto_server.client("kms")
        key_id = str(kms.create_key(Description="daemon test")["KeyMetadata"]["Arn"])
        keys = {
            "provider": "aws-kms",
            "region": moto_server.region,
            "endpoint_url": moto_server.endpoint_url,
        }
        storage = {
            "backend": "s3",
            "bucket": bucket.name,
            "region": moto_server.region,
            "endpoint_url": moto_server.endpoint_url,
        }
        extra_env = _aws_env()
    if key_store is not None:
        keys = key_store.keys_section()
        key_id = key_store.provider().create_key("new")
        extra_env = _aws_env()
    env = DaemonEnv(
        tmp=tmp,
        dsn=dsn,
        esl=esl,
        tenant=tenant,
        key_id=key_id,
        recordings=recordings,
        storage=storage,
        keys=keys,
        extra_env=extra_env,
        metrics_port=free_port(),
    )
    env.services().db.add_tenant(tenant, key_id)
    try:
        yield env
    finally:
        env.close()
        esl.close()
        drop_database(name)


@pytest.fixture
def daemon_env(tmp_path: Path) -> Iterator[DaemonEnv]:
    """Local keyring + local store + fresh database + ESL replay server process."""
    yield from make_env(tmp_path)


@pytest.fixture
def daemon_env_s3(tmp_path: Path, moto_server: Any, s3_bucket: Any) -> Iterator[DaemonEnv]:
    """Like ``daemon_env`` but with moto S3 for objects and moto KMS for the tenant key."""
    yield from make_env(tmp_path, s3=(moto_server, s3_bucket))
