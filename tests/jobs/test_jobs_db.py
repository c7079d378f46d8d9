"""The job framework against the real PostgreSQL: streaming creation, claiming, leases, counts.

Synthetic ``verify`` items (ids of no recording: each is skipped) exercise
the machinery without any recording; the kinds themselves are proved in
``tests/lifecycle/`` and ``test_workers.py``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from fsrecrypt.errors import ConfigError, InvalidState
from fsrecrypt.jobs import JobWorker, create_job, run_job
from fsrecrypt.pipeline import Services
from tests.support.factories import local_config


@pytest.fixture
def svc(tmp_path: Path, pg_dsn: str):
    services = Services(local_config(tmp_path, pg_dsn, jobs={"metrics_listen": ""}))
    before = {j.id for j in services.db.jobs(limit=10000)}
    yield services
    # Leave no active job behind: workers of later tests (same database) would work it.
    for job in services.db.jobs(limit=10000, active_only=True):
        if job.id not in before:
            services.db.cancel_job(job.id)
    services.close()


def _items(n: int):
    for _ in range(n):
        yield {"id": str(uuid.uuid4())}


def _verify_job(svc: Services, n: int):
    return create_job(
        svc,
        "verify",
        {"user_id": "t", "total_stored": 0, "tenant_id": None},
        _items(n),
        user_id="t",
    )


def test_items_are_inserted_as_they_stream_not_after_a_full_list(svc: Services) -> None:
    seen_total: list[int] = []
    job_id: list[int] = []
    original = svc.db.create_job

    def remember(*a, **kw):
        job = original(*a, **kw)
        job_id.append(job.id)
        return job

    svc.db.create_job = remember  # type: ignore[method-assign]

    def producer():
        for i in range(2500):
            if i in (1500, 2400):
                seen_total.append(svc.db.job(job_id[0]).total_items)
            yield {"id": str(uuid.uuid4())}

    job = create_job(svc, "verify", {"user_id": "t"}, producer(), user_id="t")
    # While the 1501st payload was produced, the first 1000 were already committed.
    assert seen_total == [1000, 2000]
    assert job.total_items == 2500 and job.state == "running"
    assert svc.db.job_counts(job.id)["queued"] == 2500


def test_a_failing_producer_cancels_the_job_with_the_reason(svc: Services) -> None:
    def producer():
        yield {"id": "x"}
        raise InvalidState("listing broke")

    with pytest.raises(InvalidState):
        create_job(svc, "verify", {"user_id": "t"}, producer(), user_id="t")
    job = svc.db.jobs(limit=1)[0]
    assert job.state == "cancelled" and "listing broke" in (job.error or "")


def test_claiming_uses_the_partial_index_and_skips_locked_rows(svc: Services) -> None:
    job = _verify_job(svc, 3000)
    with svc.db.transaction() as cur:
        cur.execute("ANALYZE job_items")
        cur.execute(
            "EXPLAIN SELECT job_id, seq FROM job_items WHERE job_id = %s AND state = 'queued'"
            " AND available_at <= now() ORDER BY job_id, seq LIMIT 10 FOR UPDATE SKIP LOCKED",
            (job.id,),
        )
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert "job_items_queued" in plan and "Seq Scan" not in plan, plan
    a = svc.db.claim_job_items(job.id, "a", limit=10, lease_seconds=30)
    b = svc.db.claim_job_items(job.id, "b", limit=10, lease_seconds=30)
    assert [i.seq for i in a] == list(range(1, 11))
    assert [i.seq for i in b] == list(range(11, 21))
    assert svc.db.job_counts(job.id)["running"] == 20


def test_an_expired_lease_goes_to_another_worker_and_the_old_holder_cannot_record(
    svc: Services,
) -> None:
    job = _verify_job(svc, 3)
    held = svc.db.claim_job_items(job.id, "deadhost:1:aa", limit=3, lease_seconds=1)
    assert len(held) == 3
    other = JobWorker(svc, worker="otherhost:2:bb")
    assert other.work_batch([job.id]) == 0  # nothing queued while the lease holds
    time.sleep(1.5)
    other.heartbeat()  # reaps the expired leases
    assert other.work_batch([job.id]) == 3
    # The dead holder's late outcome is refused: the item is someone else's now.
    assert not svc.db.finish_job_item(held[0], "deadhost:1:aa", "done")
    counts = svc.db.job_counts(job.id)
    assert counts["skipped"] == 3 and counts["done"] == 0


def test_heartbeat_renews_only_my_leases(svc: Services) -> None:
    job = _verify_job(svc, 4)
    mine = svc.db.claim_job_items(job.id, "me:1:x", limit=2, lease_seconds=2)
    svc.db.claim_job_items(job.id, "you:1:y", limit=2, lease_seconds=2)
    # Only the items the worker still holds: the one it gave up on is not kept alive.
    assert svc.db.renew_job_leases("me:1:x", 60, [(job.id, mine[0].seq)]) == 1
    assert svc.db.renew_job_leases("me:1:x", 60, []) == 0
    time.sleep(2.5)
    requeued, failed = svc.db.reap_job_leases(max_attempts=5)
    assert (requeued, failed) == (3, 0)
    assert svc.db.finish_job_item(mine[0], "me:1:x", "done")
    assert not svc.db.finish_job_item(mine[1], "me:1:x", "done")


def test_an_item_that_keeps_losing_its_lease_fails(svc: Services) -> None:
    job = _verify_job(svc, 1)
    for _ in range(2):
        assert svc.db.claim_job_items(job.id, "crashy:1:z", limit=1, lease_seconds=0.01)
        time.sleep(0.05)
        svc.db.reap_job_leases(max_attempts=2)
    counts = svc.db.job_counts(job.id)
    assert counts["failed"] == 1 and counts["queued"] == 0
    status = svc.db.job_status(job.id)
    assert "lease lost 2 times" in (status.first_failures[0].message or "")


def test_run_job_finishes_once_and_retry_and_cancel(svc: Services) -> None:
    job = _verify_job(svc, 25)
    seen: list[tuple[int, int]] = []
    final = run_job(svc, job.id, progress=lambda d, t: seen.append((d, t)))
    assert final.state == "done" and final.result is not None
    assert final.result["checked"] == 0 and final.result["failures"] == {}
    assert seen[0] == (0, 25) and seen[-1] == (25, 25)
    assert [d for d, _ in seen] == sorted({d for d, _ in seen})
    # A second finisher finds nothing to do.
    assert not JobWorker(svc).try_finish(job.id)
    with pytest.raises(InvalidState):
        svc.db.cancel_job(job.id)
    other = _verify_job(svc, 5)
    assert svc.db.cancel_job(other.id).state == "cancelled"
    assert svc.db.claim_job_items(other.id, "w", limit=5, lease_seconds=30) == []
    resumed, requeued = svc.db.retry_job(other.id)
    assert resumed.state == "running" and requeued == 0
    assert run_job(svc, other.id).state == "done"


def test_show_reads_counts_without_scanning_the_items(svc: Services) -> None:
    job = _verify_job(svc, 2000)
    svc.db.claim_job_items(job.id, "w:1:a", limit=7, lease_seconds=30)
    with svc.db.transaction() as cur:
        cur.execute("ANALYZE job_items")
        cur.execute(
            "EXPLAIN SELECT count(*) FROM job_items i WHERE i.state = 'running' AND i.job_id = %s",
            (job.id,),
        )
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert "Seq Scan on job_items" not in plan, plan
    status = svc.db.job_status(job.id)
    assert status.counts == {
        "total": 2000,
        "queued": 1993,
        "running": 7,
        "done": 0,
        "failed": 0,
        "skipped": 0,
    }


def test_a_job_of_an_unknown_kind_is_left_alone(svc: Services) -> None:
    """A newer fsrecrypt's job: this worker claims none of its items (none stuck leased)."""
    job = svc.db.create_job("future-kind", {}, "newer")
    svc.db.add_job_items(job.id, _items(3))
    svc.db.seal_job(job.id)
    worker = JobWorker(svc)
    assert worker.work_batch([job.id]) == 0
    assert svc.db.job_counts(job.id)["queued"] == 3
    with pytest.raises(ConfigError):
        create_job(svc, "future-kind", {}, _items(1), user_id="t")


def test_an_interrupted_command_hands_its_claimed_items_back(svc: Services) -> None:
    job = _verify_job(svc, 30)

    def interrupt(done: int, _total: int) -> None:
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(svc, job.id, progress=interrupt)
    counts = svc.db.job_counts(job.id)
    assert counts["running"] == 0 and counts["queued"] == 30 - counts["skipped"]
    assert run_job(svc, job.id).state == "done"
