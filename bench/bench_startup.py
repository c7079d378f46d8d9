"""Start-up time of the command line: ``fsrecrypt --help`` and a local-keyring ``encrypt``.

Why: operators run the command from cron, monitoring and shell loops, so
its fixed cost is paid on every call. Target: ``fsrecrypt --help`` within
150 ms. Each command is timed as a fresh process (wall clock, median of N
interleaved runs) against baselines measured in the same run: ``python -c
pass`` (the interpreter and site) and ``python -c "import click"`` (the
framework we build on), so the ratios say what our own code adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_HELP_MS = 150.0


def _fsrecrypt() -> list[str]:
    """The installed entry point beside this interpreter (what operators run), else ``-m``."""
    script = Path(sys.executable).parent / "fsrecrypt"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "fsrecrypt"]


def _wall_ms(cmd: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    elapsed = (time.perf_counter() - started) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')}")
    return elapsed


def run(runs: int = 21) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fsrecrypt-bench-startup-") as tmp:
        work = Path(tmp)
        keyring = work / "keyring.json"
        config = work / "c.toml"
        config.write_text(f'[keys]\nprovider = "local"\nkeyring = "{keyring}"\n')
        fsrecrypt = _fsrecrypt()
        subprocess.run(
            [*fsrecrypt, "-c", str(config), "keys", "create", "bench"],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )
        src = work / "small.wav"
        src.write_bytes(os.urandom(64 << 10))
        commands = {
            "python_pass": [sys.executable, "-c", "pass"],
            "python_import_click": [sys.executable, "-c", "import click"],
            "help": [*fsrecrypt, "--help"],
            "encrypt_local": [
                *fsrecrypt,
                "-c",
                str(config),
                "encrypt",
                str(src),
                str(work / "small.esdk"),
                "--key",
                "bench",
            ],
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for cmd in commands.values():  # warm the page cache and .pyc files
            _wall_ms(cmd)
        for _ in range(runs):  # interleaved, so a noisy moment hits every command alike
            for name, cmd in commands.items():
                samples[name].append(_wall_ms(cmd))
    median = {name: statistics.median(values) for name, values in samples.items()}
    result = {f"{name}_ms": round(value, 1) for name, value in median.items()}
    result["help_over_pass"] = round(median["help"] / median["python_pass"], 2)
    result["help_over_click"] = round(median["help"] / median["python_import_click"], 2)
    result["encrypt_over_click"] = round(median["encrypt_local"] / median["python_import_click"], 2)
    print(
        f"medians of {runs} runs: python -c pass {median['python_pass']:.0f} ms, "
        f"import click {median['python_import_click']:.0f} ms, "
        f"fsrecrypt --help {median['help']:.0f} ms "
        f"(x{result['help_over_pass']} pass, x{result['help_over_click']} click; "
        f"target <= {TARGET_HELP_MS:.0f} ms), "
        f"local encrypt of 64 KiB {median['encrypt_local']:.0f} ms "
        f"(x{result['encrypt_over_click']} click)"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    print(json.dumps(run(args.runs)))
