"""The worker's loops: an unexpected error is counted and the loop goes on; a streak (or a loop
that ends) stops the process with exit 70 so systemd starts a fresh one."""

from __future__ import annotations

from pathlib import Path

import gevent

from fsrecrypt.jobs.worker import EXIT_GREENLET_DIED, LOOP_CRASH_LIMIT, Worker
from tests.support.factories import local_config


def _worker(tmp_path: Path) -> Worker:
    return Worker(local_config(tmp_path, "postgresql://unused@127.0.0.1:1/x"))


def test_a_failing_pass_never_silently_ends_the_loop(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    calls: list[int] = []

    def flaky() -> bool:
        calls.append(1)
        if len(calls) < LOOP_CRASH_LIMIT:  # one short of a streak, then fine
            raise RuntimeError("boom")
        if len(calls) >= LOOP_CRASH_LIMIT + 2:
            worker.stopping.set()
        return False

    g = worker._supervise("flaky", gevent.spawn(worker._loop, "flaky", flaky, 0.01))
    g.join(10)
    assert g.successful() and len(calls) >= LOOP_CRASH_LIMIT + 2
    assert worker.exit_code == 0
    sample = worker.metrics.loop_errors.labels("flaky")._value.get()
    assert sample == LOOP_CRASH_LIMIT - 1


def test_a_streak_of_unexpected_errors_stops_the_worker_with_exit_70(tmp_path: Path) -> None:
    worker = _worker(tmp_path)

    def broken() -> bool:
        raise KeyError("always")

    g = worker._supervise("broken", gevent.spawn(worker._loop, "broken", broken, 0.01))
    g.join(10)
    gevent.sleep(0)  # let the link callback run
    assert not g.successful()
    assert worker.stopping.is_set() and worker.exit_code == EXIT_GREENLET_DIED


def test_a_loop_that_returns_before_a_stop_is_a_death_too(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    g = worker._supervise("quitter", gevent.spawn(lambda: None))
    g.join(5)
    gevent.sleep(0)
    assert worker.exit_code == EXIT_GREENLET_DIED and worker.stopping.is_set()
