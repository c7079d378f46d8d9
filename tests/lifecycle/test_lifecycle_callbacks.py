"""The lifecycle domain talks through callbacks, not the terminal.

Progress and confirmation used to be tqdm bars and click prompts inside
``fsrecrypt.lifecycle``; now the domain calls ``progress(done, total)`` and
``confirm(recordings)`` and the command line draws and asks. These tests pin
down what the callbacks are told, that ``confirm`` is asked only once the
checks have passed (and stops everything when it refuses), and that the
domain itself writes nothing to stdout or stderr.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.lifecycle.erase import erase_selected, expire
from fsrecrypt.lifecycle.holds import LegalHoldActive, add_hold, remove_hold
from fsrecrypt.lifecycle.rotate import rotate_tenant
from fsrecrypt.lifecycle.verify import verify_recordings
from fsrecrypt.pipeline import Services, ingest_file
from tests.support.factories import local_config, make_wav, unique, write_config

pytestmark = pytest.mark.integration


class Refused(Exception):
    """What a confirm callback raises to say no."""


@pytest.fixture
def world(tmp_path: Path, pg_dsn: str) -> Iterator[tuple[Services, Any, list[str], Path]]:
    config = local_config(tmp_path, pg_dsn, retention={"days": 1})
    svc = Services(config)
    key = unique("k")
    svc.keys.create_key(key)
    tenant = svc.db.add_tenant(unique("t"), key)
    ids = []
    for n in range(3):
        wav = tmp_path / "recordings" / f"cb{n}.wav"
        make_wav(wav, 0.3, seed=40 + n)
        ids.append(ingest_file(svc, str(wav), tenant.name).recording.id)
    cfg = write_config(tmp_path / "fsrecrypt.toml", config)
    yield svc, tenant, ids, cfg
    svc.close()


def _age(svc: Services, ids: Sequence[str], days: int) -> None:
    with svc.db.transaction("ageing recordings for a test") as cur:
        cur.execute(
            "UPDATE call_recordings SET created_at = now() - make_interval(days => %s)"
            " WHERE id = ANY(%s::uuid[])",
            (days, list(ids)),
        )


def test_verify_and_rotate_report_progress_and_print_nothing(world, capfd) -> None:
    svc, tenant, _ids, _cfg = world
    seen: list[tuple[int, int]] = []
    report = verify_recordings(
        svc, user_id="ops", tenant_name=tenant.name, progress=lambda d, t: seen.append((d, t))
    )
    assert report.ok == 3
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]

    new_key = unique("k")
    svc.keys.create_key(new_key)
    seen.clear()
    summary = rotate_tenant(
        svc, tenant.name, new_key, user_id="ops", progress=lambda d, t: seen.append((d, t))
    )
    assert summary.rewrapped == 3
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_erase_asks_confirm_only_after_the_checks_and_stops_when_refused(world) -> None:
    svc, _tenant, ids, _cfg = world
    victim = ids[0]
    asked: list[list[str]] = []

    def refuse(recordings: Sequence[Any]) -> None:
        asked.append([r.id for r in recordings])
        raise Refused

    add_hold(svc, reason="case 7", user_id="legal", recording_id=victim)
    with pytest.raises(LegalHoldActive):
        erase_selected(
            svc,
            reason="gdpr",
            user_id="dpo",
            recording_id=victim,
            override_retention=True,
            confirm=refuse,
        )
    assert asked == []  # a refused erasure is never offered for confirmation
    remove_hold(svc, reason="case closed", user_id="legal", recording_id=victim)

    with pytest.raises(Refused):
        erase_selected(
            svc,
            reason="gdpr",
            user_id="dpo",
            recording_id=victim,
            override_retention=True,
            confirm=refuse,
        )
    assert asked == [[victim]]
    assert svc.db.recording(victim).status == "stored"
    assert svc.db.audit_rows(recording_id=victim, action="erase") == []

    receipt = erase_selected(
        svc,
        reason="gdpr",
        user_id="dpo",
        recording_id=victim,
        override_retention=True,
        confirm=lambda recordings: None,
    )
    assert receipt["recording_ids"] == [victim]
    assert svc.db.recording(victim).status == "erased"


def test_expire_confirms_what_it_erases_and_dry_run_never_asks(world) -> None:
    svc, _tenant, ids, cfg = world
    _age(svc, ids[:2], days=3)
    dry = expire(svc, user_id="cron", dry_run=True, confirm=lambda r: pytest.fail("asked"))
    assert sorted(dry["expired"]) == sorted(ids[:2])

    # The command without --yes asks; "n" leaves everything stored.
    run = CliRunner().invoke(main, ["-c", str(cfg), "expire"], input="n\n")
    assert run.exit_code == 1, run.output
    assert "Permanently erase 2 recording(s) past retention?" in run.output
    assert {svc.db.recording(i).status for i in ids} == {"stored"}

    asked: list[list[str]] = []
    report = expire(svc, user_id="cron", confirm=lambda r: asked.append([x.id for x in r]))
    assert sorted(asked[0]) == sorted(ids[:2])
    assert sorted(report["receipt"]["recording_ids"]) == sorted(ids[:2])
    assert [svc.db.recording(i).status for i in ids] == ["erased", "erased", "stored"]
