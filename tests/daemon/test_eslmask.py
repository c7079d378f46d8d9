"""The mask events parsed (pure): the captured frames, then hostile values."""

from __future__ import annotations

import pytest

from fsrecrypt.daemon.eslmask import RecordMark, classify_mark
from fsrecrypt.daemon.eslparse import Event, parse_event_body
from fsrecrypt.errors import EventError
from tests.support.eslserver import build_event_frame, mask_frames, split_frame

DIALPLAN = "d10b97a6-e68f-4954-ba31-668384ec21b9"
API = "66666666-7777-8888-9999-000000000000"
CORE = "0b38cb3a-6f68-46c1-b6a1-22f8b85814bc"


def event(index: int, **overrides: str | None) -> Event:
    frame = mask_frames()[index]
    if overrides:
        frame = build_event_frame(frame, overrides)
    return parse_event_body(split_frame(frame)[1])


def test_captured_frames_make_exactly_the_expected_marks() -> None:
    marks = {i: classify_mark(event(i)) for i in range(37)}
    found = {i: m for i, m in marks.items() if m is not None}
    path = f"/tmp/fsrec/{DIALPLAN}.wav"
    assert found == {
        5: RecordMark("start", "record", CORE, DIALPLAN, path, 1796176435995880),
        11: RecordMark("mask", "dialplan", CORE, DIALPLAN, path, 1796176436976166),
        15: RecordMark("unmask", "dialplan", CORE, DIALPLAN, path, 1796176438975893),
        28: RecordMark("start", "record", CORE, API, "/tmp/fsrec/api-mask.wav", 1796176443995862),
        30: RecordMark("mask", "api", CORE, API, "/tmp/fsrec/api-mask.wav", 1796176444995870),
        31: RecordMark("unmask", "api", CORE, API, "/tmp/fsrec/api-mask.wav", 1796176446995844),
    }


def test_variable_prefix_and_extra_arguments() -> None:
    start = event(5, **{"Record-File-Path": "{RECORD_STEREO=true}/r/a.wav"})
    assert classify_mark(start).path == "/r/a.wav"  # type: ignore[union-attr]
    api = event(30, **{"API-Command-Argument": f"{API}  mask  /r/a.wav 30"})
    assert classify_mark(api).path == "/r/a.wav"  # type: ignore[union-attr]
    other = event(30, **{"API-Command-Argument": f"{API} start /r/a.wav"})
    assert classify_mark(other) is None
    assert classify_mark(event(30, **{"API-Command": "uuid_broadcast"})) is None


@pytest.mark.parametrize(
    ("index", "overrides"),
    [
        (30, {"Event-Date-Timestamp": "-1796176444995870"}),
        (30, {"Event-Date-Timestamp": "17961764449958700000"}),
        (30, {"Event-Date-Timestamp": "١٧٩٦١٧٦٤٤٤٩٩٥٨٧٠"}),
        (30, {"Event-Date-Timestamp": "0x1"}),
        (30, {"Event-Date-Timestamp": "12"}),
        (30, {"Event-Date-Timestamp": None}),
        (30, {"API-Command-Argument": f"{API} mask"}),
        (30, {"API-Command-Argument": f"{API} mask /r/a\x00b.wav"}),
        (30, {"API-Command-Argument": f"{API} mask /r/\udcff.wav"}),
        (30, {"API-Command-Argument": f"{API}\u00e9 mask /r/a.wav"}),
        (30, {"API-Command-Argument": f"{'a' * 200} mask /r/a.wav"}),
        (30, {"API-Command-Argument": f"{API} mask /{'a' * 5000}"}),
        (30, {"Core-UUID": None}),
        (11, {"Unique-ID": None}),
        (11, {"Application-Data": ""}),
        (11, {"Application-Data": "{only=vars}"}),
        (5, {"Record-File-Path": None}),
    ],
)
def test_hostile_mark_values_are_refused(index: int, overrides: dict[str, str | None]) -> None:
    with pytest.raises(EventError):
        classify_mark(event(index, **overrides))
