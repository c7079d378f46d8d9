"""`make bench`: every benchmark, each printing ratios against a baseline measured in the same run.

Benchmarks are not tests: machines here are noisy, so each module measures
its own baseline (raw AES-GCM loop, official SDK, plain boto3 upload, raw
ranged GET) in the same run and reports ratios. Select with --only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCHES = [
    "bench_startup",
    "bench_format",
    "bench_rss",
    "bench_daemon",
    "bench_stream",
    "bench_jobs",
    "bench_listeners",
    "bench_backfill",
    "bench_masks",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=BENCHES, default=None)
    args = parser.parse_args()
    results = {}
    for name in args.only or BENCHES:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                print(f"== {name}: not present, skipped")
                continue
            raise
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        results[name] = module.run()
        print(f"   ({time.perf_counter() - started:.0f} s)")
    print("\n== summary")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
