"""Peak RSS of ``fsrecrypt encrypt``: a 1 GiB input against a 1 MiB one, same run.

Why: the encryptor must stream with memory bounded by a few frames whatever
the file size. Target: the 1 GiB run peaks no more than 16 MiB above the
1 MiB run. Peak RSS comes from the kernel's accounting for each child
(``os.wait4`` rusage), not from sampling, so short spikes are not missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write_input(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])


def _encrypt_peak_rss(config: Path, src: Path, dst: Path) -> tuple[float, float]:
    """Run one encrypt; return (peak RSS MiB, seconds)."""
    cmd = [
        sys.executable,
        "-m",
        "fsrecrypt.cli",
        "-c",
        str(config),
        "encrypt",
        str(src),
        str(dst),
        "--key",
        "bench",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"encrypt failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return usage.ru_maxrss / 1024, elapsed


def run(big_mib: int = 1024) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fsrecrypt-bench-rss-") as tmp:
        work = Path(tmp)
        keyring = work / "keyring.json"
        config = work / "c.toml"
        config.write_text(f'[keys]\nprovider = "local"\nkeyring = "{keyring}"\n')
        subprocess.run(
            [sys.executable, "-m", "fsrecrypt.cli", "-c", str(config), "keys", "create", "bench"],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )
        small, big = work / "small.bin", work / "big.bin"
        _write_input(small, 1 << 20)
        _write_input(big, big_mib << 20)
        rss_small, _t_small = _encrypt_peak_rss(config, small, work / "small.esdk")
        rss_big, t_big = _encrypt_peak_rss(config, big, work / "big.esdk")
    result = {
        "rss_1mib_mib": round(rss_small, 1),
        f"rss_{big_mib}mib_mib": round(rss_big, 1),
        "rss_delta_mib": round(rss_big - rss_small, 1),
        "encrypt_big_mb_per_s": round((big_mib << 20) / t_big / 1e6, 1),
    }
    print(
        f"fsrecrypt encrypt peak RSS: 1 MiB input {rss_small:.1f} MiB, "
        f"{big_mib} MiB input {rss_big:.1f} MiB -> delta {rss_big - rss_small:+.1f} MiB "
        f"(target <= +16 MiB); {result['encrypt_big_mb_per_s']} MB/s end to end incl. disk"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big-mib", type=int, default=1024)
    args = parser.parse_args()
    print(json.dumps(run(args.big_mib)))
