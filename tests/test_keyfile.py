"""Key files: a key created on first use is published whole, even to concurrent first readers.

Found by the listeners benchmark: ingesting with four threads on a fresh
install, one thread read the custody fingerprint key between its creation
and its write and stopped with "not a base64 key".
"""

from __future__ import annotations

import threading
from pathlib import Path

from fsrecrypt.keyfile import KeyFileSpec, load_key_file

SPEC = KeyFileSpec(what="test key", setting="[test] key_file", power="test", created_by="a test")


def _race(path: Path, readers: int) -> list[bytes | BaseException]:
    results: list[bytes | BaseException] = []
    start = threading.Barrier(readers)

    def load() -> None:
        start.wait()
        try:
            results.append(load_key_file(str(path), SPEC))
        except BaseException as exc:  # collected for the assertion
            results.append(exc)

    threads = [threading.Thread(target=load) for _ in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_first_readers_all_get_the_one_key(tmp_path: Path) -> None:
    for round_ in range(20):
        path = tmp_path / f"k{round_}" / "test.key"
        results = _race(path, 8)
        assert all(isinstance(r, bytes) for r in results), results
        assert len(set(results)) == 1  # type: ignore[arg-type]
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert [p.name for p in path.parent.iterdir()] == ["test.key"]  # no temp name left
