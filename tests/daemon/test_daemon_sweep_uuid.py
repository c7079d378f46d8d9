"""Files adopted by the sweep keep the call UUID their name holds.

Before, a recording stored by the sweep (its RECORD_STOP never seen) had no
call UUID although FreeSWITCH had named the file after the call, so
``recordings list --call-uuid`` and the API could not find it by call.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fsrecrypt.config import Config, with_overrides
from fsrecrypt.daemon import Daemon
from fsrecrypt.daemon.sweep import call_uuid_from_name
from fsrecrypt.errors import ConfigError
from tests.support.factories import local_config, make_wav, unique

CALL = "5f0c1a52-7d3e-4b8e-9a51-0c2f6a8d4e11"
DEFAULT = Config().freeswitch.call_uuid_pattern


def test_the_default_takes_the_first_uuid_of_the_base_name_only() -> None:
    other = "11111111-2222-3333-4444-555555555555"
    assert call_uuid_from_name(f"/r/2026/{other}/x_{CALL}_{other}.wav", DEFAULT) == CALL
    assert call_uuid_from_name(f"/r/{CALL}/mixed.wav", DEFAULT) is None
    assert call_uuid_from_name("/r/\uff15f0c1a52-7d3e-4b8e-9a51-0c2f6a8d4e11.wav", DEFAULT) is None
    assert call_uuid_from_name(f"/r/{CALL}.wav", "") is None
    assert call_uuid_from_name("/r/call-42-in.wav", r"call-(\d+)-") == "42"
    assert call_uuid_from_name("/r/call-" + "9" * 500 + ".wav", r"call-(\d+)") is None


@pytest.mark.parametrize("pattern", ["[0-9", "(a)(b)", "(?P<x"])
def test_a_bad_pattern_is_a_config_error(pattern: str) -> None:
    with pytest.raises(ConfigError, match="call_uuid_pattern"):
        with_overrides(Config(), freeswitch={"call_uuid_pattern": pattern})


@pytest.mark.integration
@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        (None, f"20261202-{CALL}-in.wav", CALL),
        (r"^rec_([0-9]+)_", "rec_778899_leg.wav", "778899"),
        ("", f"{CALL}.wav", None),
    ],
)
def test_sweep_adoption_takes_the_call_uuid_from_the_name(
    tmp_path: Path, pg_dsn: str, pattern: str | None, name: str, expected: str | None
) -> None:
    tenant_name = unique("t")
    fs = {"default_tenant": tenant_name}
    if pattern is not None:
        fs["call_uuid_pattern"] = pattern
    config = local_config(tmp_path, pg_dsn, pipeline={"quiet_period": 0.0}, freeswitch=fs)
    daemon = Daemon(config)
    svc = daemon.services
    try:
        key = unique("k")
        svc.keys.create_key(key)
        svc.db.add_tenant(tenant_name, key)
        wav = tmp_path / "recordings" / name
        make_wav(wav, 0.2, seed=3)
        old = time.time() - 60
        os.utime(wav, (old, old))
        assert daemon.sweeper.sweep()["adopted"] == 1
        job = daemon.jobs.queue.get_nowait()
        assert job.call_uuid == expected
        daemon.runner.attempt(job)
        (row,) = svc.db.recordings(source_path=str(wav))
        assert row.status == "stored" and row.call_uuid == expected
    finally:
        svc.close()
