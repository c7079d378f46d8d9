"""A PRIVATE PostgreSQL cluster a test may stop and restart (never the shared system one).

``initdb`` + ``pg_ctl`` in a temporary directory, on a free loopback port,
trust authentication, run as the ``postgres`` user when the tests run as
root (PostgreSQL refuses to run as root). Use it for outage proofs:
``restartable_pg.restart()`` / ``stop()`` / ``start()``; every other test uses
the shared server through ``tests/support/pg.py``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        subprocess.run(
            ["bash", str(Path(__file__).resolve().parents[2] / ".ci" / "ensure-postgres")],
            check=True,
        )
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RestartablePostgres:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.sockets = root / "sock"
        self.log = root / "postgres.log"
        self.port = _free_port()
        self.bin = _bindir()
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> None:
        self.sockets.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_connections=100"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-o", opts, "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(self.dsn())
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.dsn(name)


@pytest.fixture
def restartable_pg() -> Iterator[RestartablePostgres]:
    """A private cluster for this test alone, with a migrated database ``fsrecrypt``."""
    root = Path(tempfile.mkdtemp(prefix="fsrecrypt-pg-"))
    cluster = RestartablePostgres(root)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster._run(
            str(cluster.bin / "pg_ctl"), "-D", str(cluster.data), "-m", "immediate", "stop",
            check=False,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
