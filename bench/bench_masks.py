"""What PCI mask tracking costs: events on the socket, and the audio check in the encrypting read.

Run: ``python bench/bench_masks.py [--calls 300] [--size-mib 64]``.

1. ESL filters. The captured mask transcript, renamed per call, mixed with
   the API events a busy switch's other clients cause (tests/support/eslmix.py),
   is emitted through the replay server (which applies ``filter`` as
   mod_event_socket does) to an EventSource subscribed as the daemon is:
   RECORD_STOP only (the baseline, no mask tracking), the mask subscription
   without filters, and with them. Reported: events and bytes received per
   RECORD_STOP and the client's CPU per RECORD_STOP.
2. The audio check. Encrypting a WAV (Encryptor.stream from a file, 64 KiB
   frames) with the keyed fingerprint (what the daemon always does) against
   the same plus the silence scanner in the same single read (mask tracked),
   and against a second read of the file by the scanner alone (what a separate
   pass would cost).

``run()`` returns the numbers for bench/run.py.
"""

from __future__ import annotations

import argparse
import os
import resource
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gevent

from fsrecrypt import format as fmt
from fsrecrypt.daemon.esl import EslSettings, EventSource
from fsrecrypt.daemon.eslsub import Subscription, recording_subscription
from fsrecrypt.maskcheck import AnnouncedSpan, ScanningReader, SilenceScanner
from fsrecrypt.pipeline.custody import FingerprintingReader, FingerprintKey
from tests.support.eslmix import busy_switch
from tests.support.eslserver import EslReplayServer


def _cpu() -> float:
    """CPU of this thread only: the client's greenlets, not the server's emitting thread."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def _events(sub: Subscription, frames: list[bytes], stops: int) -> dict[str, float]:
    server = EslReplayServer().start()
    received = {"events": 0, "stops": 0}

    def on_event(event: Any) -> None:
        received["events"] += 1
        received["stops"] += event.name == "RECORD_STOP"

    source = EventSource(
        EslSettings(port=server.port, events=sub.events, filters=sub.filters), on_event
    )
    try:
        source.start()
        while server.subscribed < 1:
            gevent.sleep(0.01)
        cpu0, wall0 = _cpu(), time.perf_counter()
        # From an OS thread (the server's sockets block): the client's greenlets
        # must keep reading meanwhile, or a full socket buffer stalls both.
        emitter = threading.Thread(target=lambda: [server.emit_frame(f) for f in frames])
        emitter.start()
        deadline = time.monotonic() + 120
        while received["stops"] < stops and time.monotonic() < deadline:
            gevent.sleep(0.01)
        cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
        emitter.join(10)
        sent_bytes = sum(c.sent_bytes for c in server._all_clients)
    finally:
        source.stop(timeout=2)
        server.stop()
    return {
        "events_per_stop": received["events"] / stops,
        "kib_per_stop": sent_bytes / 1024 / stops,
        "cpu_ms_per_stop": 1000 * cpu / stops,
        "wall_s": wall,
    }


def bench_filters(calls: int) -> dict[str, Any]:
    mix = list(busy_switch(calls, "/var/lib/freeswitch/recordings"))
    frames = [f for call in mix for f in call.frames]
    stops = len(mix)
    out = {
        "record_stop_only": _events(recording_subscription(masks=False), frames, stops),
        "masks_no_filters": _events(
            recording_subscription(masks=True, use_filters=False), frames, stops
        ),
        "masks_filtered": _events(recording_subscription(masks=True), frames, stops),
    }
    base = out["record_stop_only"]
    print(f"   {stops} calls, {len(frames)} frames emitted ({len(frames) / stops:.1f} per call)")
    for name, r in out.items():
        print(
            f"   {name:18s} {r['events_per_stop']:6.2f} events/RECORD_STOP"
            f"  {r['kib_per_stop']:7.1f} KiB/RECORD_STOP  {r['cpu_ms_per_stop']:6.2f} ms CPU"
            f"  (x{r['cpu_ms_per_stop'] / max(base['cpu_ms_per_stop'], 1e-9):.2f} CPU"
            f" of RECORD_STOP only)"
        )
    return out


def _wav(path: Path, size_mib: int) -> int:
    """A 16-bit mono 8 kHz WAV of noise with one 60 s silent span every 10 minutes."""
    rate = 8000
    n = size_mib * 1024 * 1024 // 2
    minute = rate * 60
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 36 + 2 * n) + b"WAVE")
        f.write(b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16))
        f.write(b"data" + struct.pack("<I", 2 * n))
        noise = os.urandom(2 * minute)
        for i in range(n // minute + 1):
            left = min(minute, n - i * minute)
            if left <= 0:
                break
            f.write((b"\x00\x00" * left) if i % 10 == 5 else noise[: 2 * left])
    return n * 1000 // rate


def _encrypt(path: Path, with_scanner: bool, spans: list[AnnouncedSpan], wall: int) -> float:
    key = FingerprintKey(b"k" * 32)
    encryptor = fmt.Encryptor(
        os.urandom(32),
        [fmt.EncryptedDataKey("fsrecrypt-local", b"bench" + bytes(20), os.urandom(48))],
        {"tenant": "bench"},
        frame_length=65536,
    )
    started = time.perf_counter()
    with open(path, "rb") as f:
        scanner = SilenceScanner(spans, wall)
        stream: Any = ScanningReader(f, scanner) if with_scanner else f
        reader = FingerprintingReader(stream, key.hasher("t"))
        for _chunk in encryptor.stream(reader):  # type: ignore[arg-type]
            pass
        if with_scanner:
            assert scanner.finish().verified
    return time.perf_counter() - started


def _scan_only(path: Path, spans: list[AnnouncedSpan], wall: int) -> float:
    started = time.perf_counter()
    scanner = SilenceScanner(spans, wall)
    with open(path, "rb") as f:
        reader = ScanningReader(f, scanner)
        buf = bytearray(65536)
        while reader.readinto(memoryview(buf)):
            pass
    assert scanner.finish().verified
    return time.perf_counter() - started


def bench_scan(size_mib: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.wav"
        total_ms = _wav(path, size_mib)
        spans = [
            AnnouncedSpan(m * 60_000, (m + 1) * 60_000, "api")
            for m in range(5, total_ms // 60_000, 10)
            if (m + 1) * 60_000 <= total_ms
        ]
        best: dict[str, float] = {}
        for _ in range(7):
            for name, fn in (
                ("encrypt", lambda: _encrypt(path, False, spans, total_ms)),
                ("encrypt+scan", lambda: _encrypt(path, True, spans, total_ms)),
                ("scan_second_read", lambda: _scan_only(path, spans, total_ms)),
            ):
                best[name] = min(best.get(name, float("inf")), fn())
    mb = size_mib * 1.048576
    base = best["encrypt"]
    print(
        f"   {size_mib} MiB WAV ({total_ms / 3_600_000:.1f} h at 8 kHz), {len(spans)} masked spans"
    )
    for name, seconds in best.items():
        print(f"   {name:18s} {mb / seconds:8.1f} MB/s  x{seconds / base:.3f} of encrypt alone")
    return {name: mb / s for name, s in best.items()} | {
        "scan_overhead_in_pass": best["encrypt+scan"] / base - 1,
        "second_read_overhead": best["scan_second_read"] / base,
    }


def run(calls: int = 300, size_mib: int = 64) -> dict[str, Any]:
    return {"filters": bench_filters(calls), "scan": bench_scan(size_mib)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args()
    run(args.calls, args.size_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
