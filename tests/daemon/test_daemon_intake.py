"""The event intake: each RECORD_STOP's pending row is written off the ESL dispatcher.

Why: written by the dispatcher itself, one database round trip per event and
one event after another, a burst of RECORD_STOPs queued behind the
database's latency (the dispatcher was busy 100% of a burst at about 150
events/s). Now a pool of intake greenlets writes the rows; these tests pin
what must not change: every event still gets its row and exactly one job, a
duplicate event for a file already in hand gets neither twice, and a bug
while writing a row loses no job.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import gevent
import pytest

from fsrecrypt.daemon import Daemon
from fsrecrypt.daemon.eslparse import parse_event_body
from tests.support.eslserver import build_event_frame, split_frame
from tests.support.factories import local_config, make_wav, unique

pytestmark = pytest.mark.integration


def record_stop(path: Path, tenant: str) -> object:
    body = split_frame(
        build_event_frame(
            "record_stop.esl",
            {
                "Record-File-Path": str(path),
                "Channel-Call-UUID": str(uuid.uuid4()),
                "variable_fsrecrypt_tenant": tenant,
            },
        )
    )[1]
    return parse_event_body(body)


@pytest.fixture
def daemon(tmp_path: Path, pg_dsn: str):  # type: ignore[no-untyped-def]
    tenant = unique("t")
    config = local_config(
        tmp_path,
        pg_dsn,
        freeswitch={"default_tenant": tenant, "host": "127.0.0.1", "port": 9},
    )
    d = Daemon(config)
    key = unique("k")
    d.services.keys.create_key(key)
    d.services.db.add_tenant(tenant, key)
    d.tenant_name = tenant  # type: ignore[attr-defined]
    yield d
    d.services.close()


def queued(daemon: Daemon) -> list:  # type: ignore[type-arg]
    jobs = []
    while not daemon.jobs.queue.empty():
        jobs.append(daemon.jobs.queue.get_nowait())
    return jobs


def test_every_event_gets_its_row_and_one_job(daemon: Daemon, tmp_path: Path) -> None:
    paths = []
    for i in range(40):
        path = tmp_path / "recordings" / f"intake-{i}.wav"
        make_wav(path, 0.05, seed=i)
        paths.append(path)
    for path in paths:
        daemon.handler.on_event(record_stop(path, daemon.tenant_name))  # type: ignore[attr-defined]
    # The same file announced twice (FreeSWITCH replays after a reconnect).
    daemon.handler.on_event(record_stop(paths[0], daemon.tenant_name))  # type: ignore[attr-defined]
    daemon.handler.intake.join(timeout=30)
    jobs = queued(daemon)
    assert sorted(j.path for j in jobs) == sorted(str(p) for p in paths)
    rows = {r.source_path: r for r in daemon.services.db.recordings(status=["pending"])}
    for job in jobs:
        assert job.recording_id == rows[job.path].id  # the row was written before the job ran
    # A file already in hand: its second announcement makes neither a row nor a job.
    daemon.handler.on_event(record_stop(paths[1], daemon.tenant_name))  # type: ignore[attr-defined]
    daemon.handler.intake.join(timeout=30)
    assert queued(daemon) == []
    assert len(daemon.services.db.recordings(source_path=str(paths[1]))) == 1


def test_a_bug_while_writing_the_row_loses_no_job(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "recordings" / "intake-bug.wav"
    make_wav(path, 0.05, seed=99)

    def broken(**_kwargs: object) -> None:
        raise ZeroDivisionError("a bug in the row's code")

    monkeypatch.setattr(daemon.services.db, "create_pending_for_tenant_name", broken)
    daemon.handler.on_event(record_stop(path, daemon.tenant_name))  # type: ignore[attr-defined]
    daemon.handler.intake.join(timeout=30)
    (job,) = queued(daemon)
    assert job.path == str(path) and job.recording_id is None  # the job registers itself
    monkeypatch.undo()
    assert daemon.runner.attempt(job) is False
    (row,) = daemon.services.db.recordings(source_path=str(path))
    assert row.status == "stored" and not path.exists()


def test_the_dispatcher_does_not_wait_for_the_database(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow database (a remote PostgreSQL, a lock) holds up rows, not the next events."""
    paths = []
    for i in range(8):
        path = tmp_path / "recordings" / f"slow-{i}.wav"
        make_wav(path, 0.05, seed=200 + i)
        paths.append(path)
    real = daemon.services.db.create_pending_for_tenant_name

    def slow(**kwargs: object):  # type: ignore[no-untyped-def]
        gevent.sleep(0.5)
        return real(**kwargs)

    monkeypatch.setattr(daemon.services.db, "create_pending_for_tenant_name", slow)
    started = time.monotonic()
    for path in paths:
        daemon.handler.on_event(record_stop(path, daemon.tenant_name))  # type: ignore[attr-defined]
    dispatched = time.monotonic() - started
    daemon.handler.intake.join(timeout=30)
    assert dispatched < 0.5, "each event waited for its row"
    assert len(queued(daemon)) == len(paths)
