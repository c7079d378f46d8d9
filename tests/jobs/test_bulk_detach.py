"""``erase --tenant`` and ``expire`` with ``--detach``: the job is left for workers, its result
is the same receipt the attached command prints, and the effect happens once."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.jobs import JobWorker, run_job
from fsrecrypt.lifecycle.erase import erasure_receipt, receipt_hash
from tests.lifecycle.test_lifecycle_callbacks import _age, world  # noqa: F401 - fixture


def _cli(cfg, *args: str):
    return CliRunner().invoke(main, ["-c", str(cfg), *args], catch_exceptions=False)


def test_erase_tenant_detached_is_finished_by_workers_with_one_receipt(world) -> None:  # noqa: F811
    svc, tenant, ids, cfg = world
    run = _cli(cfg, "erase", "--tenant", tenant.name, "--reason", "GDPR-7", "--yes",
               "--override-retention", "--detach")  # fmt: skip
    assert run.exit_code == 0, run.output
    job_id = json.loads(run.stdout)["job"]
    assert all(svc.db.recording(i).status == "stored" for i in ids)  # nothing done yet
    # Two "workers" share it; a third finisher finds nothing left to write.
    a, b = JobWorker(svc), JobWorker(svc)
    while a.work_batch([job_id]) + b.work_batch([job_id]):
        pass
    assert a.try_finish(job_id) and not b.try_finish(job_id)
    job = svc.db.job(job_id)
    receipt = erasure_receipt(job)
    assert sorted(receipt["recording_ids"]) == sorted(ids)
    assert receipt["receipt_hash"] == receipt_hash(receipt)
    assert all(svc.db.recording(i).status == "erased" for i in ids)
    with svc.db.transaction() as cur:
        cur.execute("SELECT count(*) FROM erasure_receipts WHERE id = %s", (receipt["receipt_id"],))
        assert cur.fetchone()[0] == 1
    erased = [r for r in svc.db.audit_rows(tenant_id=tenant.id, action="erase") if r["success"]]
    assert sorted(r["recording_id"] for r in erased) == sorted(ids)  # exactly once each
    shown = json.loads(_cli(cfg, "jobs", "show", str(job_id), "--json").stdout)
    assert shown["state"] == "done" and shown["counts"]["done"] == 3


def test_expire_detached_then_worked_writes_the_expire_audit_row(world) -> None:  # noqa: F811
    svc, _tenant, ids, cfg = world
    _age(svc, ids[:2], 5)
    run = _cli(cfg, "expire", "--yes", "--detach")
    assert run.exit_code == 0, run.output
    job_id = json.loads(run.stdout)["job"]
    final = run_job(svc, job_id)
    assert final.kind == "expire" and final.state == "done"
    receipt = erasure_receipt(final)
    # (The session database may hold other tests' aged recordings: they expire too.)
    assert set(ids[:2]) <= set(receipt["recording_ids"]) and ids[2] not in receipt["recording_ids"]
    assert svc.db.recording(ids[2]).status == "stored"
    rows = [r for r in svc.db.audit_rows(action="expire") if r["recording_id"] is None]
    assert rows[-1]["success"] and rows[-1]["details"]["erased"] == len(receipt["recording_ids"])
    assert rows[-1]["details"]["receipt_id"] == receipt["receipt_id"]


def test_erase_tenant_never_loads_the_tenants_recordings_into_a_list(world) -> None:  # noqa: F811
    """A tenant may own millions: the checks are SQL, the selection and the items stream."""
    svc, tenant, ids, _cfg = world

    def no_full_listing(**_kw):
        raise AssertionError("erase --tenant listed every recording into memory")

    svc.db.recordings = no_full_listing  # type: ignore[method-assign]
    shown: list[tuple[int, list[str]]] = []
    from fsrecrypt.lifecycle.erase import erase_selected

    receipt = erase_selected(
        svc,
        reason="GDPR-9",
        user_id="dpo",
        tenant_name=tenant.name,
        override_retention=True,
        confirm=lambda sel: shown.append((len(sel), [r.id for r in sel[:2]])),
    )
    assert shown == [(3, sorted(ids)[:2])]
    assert sorted(receipt["recording_ids"]) == sorted(ids)
    del svc.db.recordings
    assert all(svc.db.recording(i).status == "erased" for i in ids)


def test_erase_tenant_refusals_are_checked_in_sql(world) -> None:  # noqa: F811
    svc, tenant, ids, _cfg = world
    from fsrecrypt.lifecycle.erase import RetentionActive, erase_selected
    from fsrecrypt.lifecycle.holds import LegalHoldActive, add_hold

    with pytest.raises(RetentionActive, match=r"3 recording\(s\) are inside the retention period"):
        erase_selected(svc, reason="x", user_id="dpo", tenant_name=tenant.name)
    add_hold(svc, reason="case 1", user_id="counsel", recording_id=ids[1])
    with pytest.raises(LegalHoldActive, match=ids[1]):
        erase_selected(
            svc, reason="x", user_id="dpo", tenant_name=tenant.name, override_retention=True
        )
    assert all(svc.db.recording(i).status == "stored" for i in ids)
