"""The audio check of masked spans (pure): the captured WAVs, forged spans, hostile files."""

from __future__ import annotations

import io
import math
import struct
import time

import pytest

from fsrecrypt.maskcheck import (
    AnnouncedSpan,
    ScanningReader,
    SilenceScanner,
    announced_spans,
)
from tests.support.eslserver import FIXTURES_DIR

MASK_DIR = FIXTURES_DIR / "mask"
# From transcript_mask.raw: RECORD_START, mask, unmask, RECORD_STOP (Event-Date-Timestamp).
DIALPLAN = (1796176435995880, 1796176436976166, 1796176438975893, 1796176439975864)
API = (1796176443995862, 1796176444995870, 1796176446995844, 1796176447995829)


def scan(data: bytes, spans: list[AnnouncedSpan], wall_ms: int | None, chunk: int = 65536):
    scanner = SilenceScanner(spans, wall_ms)
    reader = ScanningReader(io.BytesIO(data), scanner)
    buf = bytearray(chunk)
    while reader.readinto(memoryview(buf)):
        pass
    return scanner.finish()


def wav(pcm: bytes, rate: int = 8000, channels: int = 1, bits: int = 16, tag: int = 1) -> bytes:
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(pcm))
    return b"RIFF" + struct.pack("<I", len(body) + len(pcm)) + body + pcm


def tone(ms: int, rate: int = 8000) -> bytes:
    n = rate * ms // 1000
    return b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)) or 1) for i in range(n)
    )


def zeros(ms: int, rate: int = 8000) -> bytes:
    return b"\x00\x00" * (rate * ms // 1000)


def _spans(times: tuple[int, int, int, int], via: str) -> tuple[list[AnnouncedSpan], int]:
    start, mask, unmask, stop = times
    marks = [("mask", via, mask), ("unmask", via, unmask)]
    return announced_spans(start, stop, marks), (stop - start) // 1000


@pytest.mark.parametrize("chunk", [1, 3, 4096, 65536])
def test_dialplan_capture_span_is_found_where_the_audio_has_it(chunk: int) -> None:
    data = (MASK_DIR / "dialplan_mask.wav").read_bytes()
    spans, wall = _spans(DIALPLAN, "dialplan")
    verdict = scan(data, spans, wall, chunk)
    assert verdict.verified and verdict.reason is None
    (span,) = verdict.spans
    assert (span["announced_start_ms"], span["announced_end_ms"]) == (980, 2980)
    assert (span["start_ms"], span["end_ms"], span["silent"]) == (1000, 3000, True)


def test_api_capture_span_sits_half_a_second_before_the_events() -> None:
    data = (MASK_DIR / "api_mask.wav").read_bytes()
    spans, wall = _spans(API, "api")
    verdict = scan(data, spans, wall)
    assert verdict.verified
    (span,) = verdict.spans
    assert (span["announced_start_ms"], span["announced_end_ms"]) == (1000, 2999)
    assert (span["start_ms"], span["end_ms"], span["via"]) == (500, 2500, "api")


def test_forged_mask_over_tone_is_not_verified() -> None:
    data = (MASK_DIR / "dialplan_mask.wav").read_bytes()
    start = DIALPLAN[0]
    spans = announced_spans(
        start,
        DIALPLAN[3],
        [("mask", "api", start + 3_100_000), ("unmask", "api", start + 3_900_000)],
    )
    verdict = scan(data, spans, 3980)
    assert not verdict.verified and "not digital silence" in (verdict.reason or "")
    assert verdict.spans[0]["silent"] is False and verdict.spans[0]["start_ms"] is None


def test_a_real_span_and_a_forged_one_make_the_recording_unverified() -> None:
    data = (MASK_DIR / "dialplan_mask.wav").read_bytes()
    start, mask, unmask, stop = DIALPLAN
    marks = [("mask", "dialplan", mask), ("unmask", "dialplan", unmask)]
    marks += [("mask", "api", start + 3_300_000), ("unmask", "api", start + 3_800_000)]
    verdict = scan(data, announced_spans(start, stop, marks), 3980)
    assert [s["silent"] for s in verdict.spans] == [True, False]
    assert not verdict.verified


def test_mask_open_at_record_stop_must_be_silent_to_the_end() -> None:
    start = 1796176435995880
    marks = [("mask", "dialplan", start + 1_000_000)]
    spans = announced_spans(start, start + 3_000_000, marks)
    assert spans == [AnnouncedSpan(1000, None, "dialplan")]
    good = scan(wav(tone(1000) + zeros(2000)), spans, 3000)
    assert good.verified
    assert good.spans[0] | {} == {
        "announced_start_ms": 1000,
        "announced_end_ms": None,
        "open_at_stop": True,
        "via": "dialplan",
        "start_ms": 1000,
        "end_ms": 3000,
        "silent": True,
    }
    resumed = scan(wav(tone(1000) + zeros(1500) + tone(500)), spans, 3000)
    assert not resumed.verified


def test_mask_that_never_reached_the_file_is_not_verified() -> None:
    spans, wall = _spans(DIALPLAN, "dialplan")
    assert not scan(wav(tone(4000)), spans, wall).verified


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"ID3\x03" + b"\x00" * 5000, "not a WAV"),
        (wav(b"\x80" * 32000, bits=8), "not signed PCM"),
        (wav(b"\xff" * 32000, bits=8, tag=7), "not signed PCM"),
        (b"RIFF\x00\x00\x00\x00WAVE", "ended before"),
        (b"RIFF\x00\x00\x00\x00WAVE" + b"LIST" + struct.pack("<I", 10**6) + b"x" * 70000, "64 KiB"),
        (b"", "ended before"),
    ],
)
def test_files_that_cannot_be_checked_are_not_verified(data: bytes, reason: str) -> None:
    spans, wall = _spans(DIALPLAN, "dialplan")
    verdict = scan(data, spans, wall)
    assert not verdict.verified and reason in (verdict.reason or "")


def test_stereo_silence_needs_both_channels_silent() -> None:
    def interleave(left: bytes, right: bytes) -> bytes:
        return b"".join(left[i : i + 2] + right[i : i + 2] for i in range(0, len(left), 2))

    pre = interleave(tone(1000), tone(1000))
    both = interleave(zeros(2000), zeros(2000))
    left_only = interleave(zeros(2000), tone(2000))
    spans = [AnnouncedSpan(1000, 3000, "api")]
    assert scan(wav(pre + both + pre, channels=2), spans, 4000).verified
    assert not scan(wav(pre + left_only + pre, channels=2), spans, 4000).verified


def test_announced_spans_follow_freeswitch_flag_semantics() -> None:
    s = 10**15
    marks = [
        ("unmask", "api", s + 1_000_000),  # not masked: nothing
        ("mask", "api", s - 5_000),  # stamped before RECORD_START: clamped to 0
        ("mask", "dialplan", s + 2_000_000),  # already masked: nothing
        ("unmask", "dialplan", s + 3_000_000),
        ("mask", "api", s + 4_000_000),
        ("unmask", "api", s + 4_000_000),  # zero length: dropped
        ("mask", "api", s + 99_000_000),  # after RECORD_STOP: clamped, open, zero
    ]
    assert announced_spans(s, s + 5_000_000, marks) == [
        AnnouncedSpan(0, 3000, "api"),
        AnnouncedSpan(5000, None, "api"),
    ]


def test_thousands_of_spans_in_one_pass() -> None:
    """2000 masked 100 ms spans between 100 ms of tone: linear, all found."""
    n = 2000
    pcm = (tone(100) + zeros(100)) * n
    s = 10**15
    marks = []
    for i in range(n):
        marks += [
            ("mask", "api", s + (200 * i + 100) * 1000),
            ("unmask", "api", s + 200 * (i + 1) * 1000),
        ]
    spans = announced_spans(s, s + 400_000_000, marks)
    assert len(spans) == n
    began = time.perf_counter()
    verdict = scan(wav(pcm), spans, 400_000)
    assert verdict.verified, verdict.reason
    assert time.perf_counter() - began < 10
    assert verdict.spans[-1]["start_ms"] == 200 * n - 100


def test_flooded_marks_make_the_verdict_false() -> None:
    data = (MASK_DIR / "dialplan_mask.wav").read_bytes()
    spans, wall = _spans(DIALPLAN, "dialplan")
    scanner = SilenceScanner(spans, wall, flooded=True)
    scanner.feed(data)
    verdict = scanner.finish()
    assert not verdict.verified and "more mask events" in (verdict.reason or "")


def test_repeated_and_overlapping_spans_are_merged() -> None:
    s = 10**15
    marks = [("mask", "api", s + 1_000_000), ("unmask", "api", s + 3_000_000)] * 500
    marks += [("mask", "dialplan", s + 2_500_000), ("unmask", "dialplan", s + 3_500_000)]
    marks += [("mask", "api", s + 5_000_000)]
    assert announced_spans(s, s + 9_000_000, marks) == [
        AnnouncedSpan(1000, 3500, "api"),
        AnnouncedSpan(5000, None, "api"),
    ]


def test_first_nonzero_finds_the_exact_byte() -> None:
    from fsrecrypt.maskcheck import _first_nonzero

    for size in (1, 63, 64, 65, 1000, 65536):
        for at in {0, size // 3, size - 1}:
            chunk = bytearray(size)
            chunk[at] = 7
            for pos in {0, at, max(0, at - 1)}:
                assert _first_nonzero(bytes(chunk), pos) == at
            assert _first_nonzero(bytes(chunk), at + 1) is None
