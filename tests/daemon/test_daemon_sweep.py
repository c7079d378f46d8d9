"""The sweep contains one file's unexpected error: the others are still adopted.

Before, an exception while judging one file (a bug, a library error on an odd
name or header) failed the whole sweep pass; every file after it waited, and
five such passes in a row made the supervisor restart the daemon, so one odd
file could keep it in a restart loop without ever adopting the rest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fsrecrypt.daemon import Daemon
from fsrecrypt.daemon import sweep as sweep_module
from tests.support.factories import local_config, make_wav, unique


@pytest.mark.integration
def test_one_odd_file_is_refused_and_the_sweep_adopts_the_others(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant_name = unique("t")
    config = local_config(
        tmp_path,
        pg_dsn,
        pipeline={"quiet_period": 0.0},
        freeswitch={"default_tenant": tenant_name},
    )
    daemon = Daemon(config)
    svc = daemon.services
    try:
        key = unique("k")
        svc.keys.create_key(key)
        svc.db.add_tenant(tenant_name, key)
        recordings = tmp_path / "recordings"
        odd = recordings / "a-odd.wav"
        good = [recordings / f"b-good-{n}.wav" for n in range(2)]
        for n, path in enumerate([odd, *good]):
            make_wav(path, 0.2, seed=n)
        old = time.time() - 60
        for path in [odd, *good]:
            os.utime(path, (old, old))

        judged: list[str] = []
        real = sweep_module.wav_complete

        def wav_complete(path: str, dirs: object = None) -> bool:
            judged.append(path)
            if path == str(odd):
                raise RuntimeError("a library choked on this one file")
            return real(path, dirs)

        monkeypatch.setattr(sweep_module, "wav_complete", wav_complete)

        first = daemon.sweeper.sweep()
        assert first["adopted"] == 2
        queued = []
        while not daemon.jobs.queue.empty():
            queued.append(daemon.jobs.queue.get_nowait().path)
        assert sorted(queued) == sorted(str(p) for p in good)
        assert odd.exists()  # left in place
        assert daemon.rt.counts["refused"] == 1
        assert daemon.rt.metrics.refused.labels("internal-error")._value.get() == 1
        assert str(odd) in daemon.sweeper.failed_files

        # Unchanged, it is not judged again: no log flood, no failed pass.
        for path in good:
            daemon.jobs.busy.discard(str(path))
            path.unlink()
        judged.clear()
        assert daemon.sweeper.sweep()["adopted"] == 0
        assert str(odd) not in judged
        assert daemon.rt.counts["refused"] == 1

        # Once it changes, it is looked at again (and adopted when judged fine).
        monkeypatch.setattr(sweep_module, "wav_complete", real)
        make_wav(odd, 0.3, seed=9)
        os.utime(odd, (old + 1, old + 1))
        assert daemon.sweeper.sweep()["adopted"] == 1
        assert daemon.jobs.queue.get_nowait().path == str(odd)
        assert str(odd) not in daemon.sweeper.failed_files
    finally:
        svc.close()
