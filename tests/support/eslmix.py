"""A busy switch's event stream, built from the captured mask transcript.

Each call of the mix is what the real FreeSWITCH sent for one recorded call
(``tests/fixtures/freeswitch/mask/transcript_mask.raw``: CHANNEL_EXECUTE and
_COMPLETE per dialplan application, RECORD_START/STOP, the mask events), with
fresh UUIDs and paths, plus the API events other ESL clients cause on a
production switch (monitoring ``status``/``show channels``, a CRM's
``uuid_getvar``/``uuid_setvar``, ``originate``...). The bench
(``bench/bench_esl_filters.py``) and the filter test emit it through the
replay server, so "events received per RECORD_STOP" is measured on the
real frames.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from fsrecrypt.daemon.eslparse import parse_event_body
from tests.support.eslserver import build_event_frame, mask_frames, split_frame

# API commands a busy switch runs per call besides ours (a monitoring poller,
# a CRM, a click-to-call web app): not recording related.
OTHER_API = (
    ("status", None),
    ("show", "channels as json"),
    ("uuid_getvar", "{uuid} sip_from_user"),
    ("uuid_setvar", "{uuid} crm_ticket 4711"),
    ("uuid_exists", "{uuid}"),
    ("sofia", "status profile internal"),
    ("uuid_record", "{uuid} start {path}"),  # ours: the start of an API recording
    ("uuid_broadcast", "{uuid} mask.wav aleg"),  # "mask" in a path, not a mask
)


@dataclass(frozen=True)
class MixCall:
    """One call's frames and what the daemon must see of them."""

    frames: list[bytes]
    wanted: int  # frames a filtered subscription must deliver


def _rewrite(frame: bytes, old_uuid: str, new_uuid: str, old_path: str, path: str) -> bytes:
    """The frame with a call's UUID and path replaced (lengths recomputed)."""
    event = parse_event_body(split_frame(frame)[1])
    overrides: dict[str, str | None] = {}
    for name, value in event.headers.items():
        if name == "Content-Length":
            continue
        new = value.replace(old_uuid, new_uuid).replace(old_path, path)
        if new != value:
            overrides[name] = new
    return build_event_frame(frame, overrides, event_body=event.body)


def dialplan_call(recordings_dir: str, masked: bool = True) -> MixCall:
    """The captured dialplan call (frames 1-22 minus the originate's API event), renamed."""
    frames = mask_frames()[:22]
    old_uuid = "d10b97a6-e68f-4954-ba31-668384ec21b9"
    old_path = f"/tmp/fsrec/{old_uuid}.wav"
    new_uuid = str(uuid.uuid4())
    path = f"{recordings_dir}/{new_uuid}.wav"
    out: list[bytes] = []
    wanted = 0
    for frame in frames:
        text = frame.decode("utf-8", "replace")
        if "Event-Name: API" in text:
            continue
        is_mask = "Application: record_session_mask" in text or (
            "Application: record_session_unmask" in text
        )
        if is_mask and not masked:
            continue
        out.append(_rewrite(frame, old_uuid, new_uuid, old_path, path))
        record = "Event-Name: RECORD_" in text
        wanted += record or (is_mask and "Event-Name: CHANNEL_EXECUTE\n" in text)
    return MixCall(out, wanted)


def other_api_events(call_uuid: str, path: str) -> Iterator[tuple[bytes, bool]]:
    """The per-call API events of the other clients; True for those we filter in."""
    template = mask_frames()[30]
    for command, arg in OTHER_API:
        argument = arg.format(uuid=call_uuid, path=path) if arg else None
        frame = build_event_frame(
            template, {"API-Command": command, "API-Command-Argument": argument}
        )
        yield frame, command == "uuid_record"


def busy_switch(calls: int, recordings_dir: str, masked_every: int = 4) -> Iterator[MixCall]:
    """``calls`` recorded calls; every ``masked_every``-th one masks a span."""
    for n in range(calls):
        call = dialplan_call(recordings_dir, masked=n % masked_every == 0)
        frames = list(call.frames)
        wanted = call.wanted
        for frame, ours in other_api_events(str(uuid.uuid4()), f"{recordings_dir}/x.wav"):
            frames.insert(len(frames) // 2, frame)
            wanted += ours
        yield MixCall(frames, wanted)
