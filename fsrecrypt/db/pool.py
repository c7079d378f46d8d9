"""The connection pool: psycopg2 connections (psycogreen under gevent) and transactions.

psycopg2 is imported here, at the top: nothing on the light paths
(``fsrecrypt --help``, a local ``encrypt``/``decrypt``) imports
:mod:`fsrecrypt.db`; the command line loads the modules that do only when
their command is named. Cooperating with gevent is a runtime decision, made
in one place: :func:`enable_gevent` (called by the daemon and the web server
after monkey-patching) imports psycogreen, and with it gevent, and installs
its wait callback so a query yields to the hub instead of blocking the ESL
reader.

Errors: connection-level failures become :class:`DatabaseError` (transient,
the pipeline retries them); a unique violation becomes :class:`AlreadyExists`
and a missing table :class:`SchemaOutOfDate`, which callers can act on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.errors

from fsrecrypt.errors import AlreadyExists, DatabaseError, SchemaOutOfDate

_gevent_enabled = False


def enable_gevent() -> None:
    """Make psycopg2 cooperative (call once, after gevent monkey-patching).

    psycogreen is imported here, not at the top, because it imports gevent:
    only a process that runs under gevent pays for it.
    """
    global _gevent_enabled
    if not _gevent_enabled:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
        _gevent_enabled = True


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    try:
        yield
    except psycopg2.errors.UniqueViolation as exc:
        raise AlreadyExists(f"{what}: {exc.diag.message_detail or 'already exists'}") from None
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseError(f"{what}: database unavailable ({first})") from None
    except psycopg2.errors.UndefinedTable:
        raise SchemaOutOfDate(f"{what}: the database has no fsrecrypt schema") from None


def connect(dsn: str, *, connect_timeout: float = 5.0) -> Any:
    with translate_errors("connecting to PostgreSQL"):
        return psycopg2.connect(dsn, connect_timeout=max(1, int(connect_timeout)))


class Pool:
    """A small connection pool, safe to share across greenlets and threads.

    The per-responsibility query classes (tenants, recordings, the work
    queue, the audit log) derive from it and speak only through
    :meth:`transaction` and :meth:`statement`.
    """

    def __init__(self, dsn: str, *, max_connections: int = 8, connect_timeout: float = 5.0):
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._max = max_connections
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        self._slots.acquire()
        conn = None
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = connect(self.dsn, connect_timeout=self.connect_timeout)
            yield conn
        except BaseException:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
            raise
        finally:
            if conn is not None and not conn.closed:
                with self._lock:
                    self._idle.append(conn)
            self._slots.release()

    @contextlib.contextmanager
    def transaction(self, what: str = "database operation") -> Iterator[Any]:
        """A cursor inside one transaction: committed on success, rolled back on error."""
        with translate_errors(what), self.connection() as conn:
            try:
                with conn.cursor() as cur:
                    yield cur
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.rollback()
                raise

    @contextlib.contextmanager
    def statement(self, what: str = "database operation") -> Iterator[Any]:
        """A cursor for ONE self-contained statement, run in autocommit.

        Why: psycopg2 wraps every transaction in its own BEGIN and COMMIT
        round trips. A single statement is atomic (and durable once it
        returns) on its own, so the daemon's per-recording statements use this
        and pay one round trip instead of three. Never use it for work that
        needs several statements to be atomic together: use ``transaction``.
        """
        with translate_errors(what), self.connection() as conn:
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    yield cur
            finally:
                try:
                    conn.autocommit = False
                except psycopg2.Error:  # a broken connection: drop it rather than pool it
                    conn.close()
