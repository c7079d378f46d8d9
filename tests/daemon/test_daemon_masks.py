"""PCI masking end to end: captured frames and WAVs replayed through the daemon subprocess.

The frames are the real ones (``tests/fixtures/freeswitch/mask/transcript_mask.raw``),
only the path and tenant rewritten to the test's; the WAVs are the ones
FreeSWITCH wrote for those calls. Proved here: spans stored where the audio
has them and verified (dialplan and API), a forged mask over tone flagged
and still stored, a mask open at RECORD_STOP, a SIGKILL between mask and
RECORD_STOP, only the filtered events on the daemon's socket, hostile mask
events refused without harm.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import pytest

from fsrecrypt.daemon.eslparse import parse_event_body
from fsrecrypt.daemon.masks import check_masks
from fsrecrypt.errors import InvalidState
from tests.support.daemon import ROOT, DaemonEnv
from tests.support.eslserver import build_event_frame, mask_frames, split_frame

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MASK_DIR = ROOT / "tests" / "fixtures" / "freeswitch" / "mask"
# Indexes into the transcript's frames: RECORD_START, mask, unmask, RECORD_STOP.
CALLS = {
    "dialplan": ("d10b97a6-e68f-4954-ba31-668384ec21b9", "dialplan_mask.wav", (5, 11, 15, 21)),
    "api": ("66666666-7777-8888-9999-000000000000", "api_mask.wav", (28, 30, 31, 32)),
}


class MaskCall:
    """One captured call, renamed: a fresh channel UUID and a path in the test's directory."""

    def __init__(self, env: DaemonEnv, kind: str, wav: bytes | None = None) -> None:
        self.env = env
        old_uuid, wav_name, self.indexes = CALLS[kind]
        self.kind = kind
        self.channel = str(uuid.uuid4())
        self.path = env.recordings / f"{self.channel}.wav"
        self.wav = wav if wav is not None else (MASK_DIR / wav_name).read_bytes()
        frames = mask_frames()
        self.frames = [self._rename(frames[i], old_uuid) for i in self.indexes]

    def _rename(self, frame: bytes, old_uuid: str) -> bytes:
        event = parse_event_body(split_frame(frame)[1])
        overrides: dict[str, str | None] = {}
        for name, value in event.headers.items():
            if name == "Content-Length":
                continue
            new = value.replace(old_uuid, self.channel)
            if "/tmp/fsrec/" in new:
                new = new.split("/tmp/fsrec/")[0] + str(self.path)
            if new != value:
                overrides[name] = new
        if event.name == "RECORD_STOP":
            overrides["variable_fsrecrypt_tenant"] = self.env.tenant
        return build_event_frame(frame, overrides, event_body=event.body)

    def frame(self, step: str, **overrides: str | None) -> bytes:
        index = ("start", "mask", "unmask", "stop").index(step)
        return build_event_frame(self.frames[index], overrides) if overrides else self.frames[index]

    def emit(self, *steps: str) -> None:
        for step in steps:
            if step == "stop":
                self.path.write_bytes(self.wav)
            emit(self.env, self.frame(step))


def emit(env: DaemonEnv, *frames: bytes) -> int:
    encoded = [base64.b64encode(f).decode() for f in frames]
    return int(env.esl.call("emit_frames", frames_b64=encoded))


def marks_in_db(env: DaemonEnv) -> int:
    with env.services().db.transaction("test") as cur:
        cur.execute("SELECT count(*) FROM recording_mask_marks")
        return int(cur.fetchone()[0])


def metric(env: DaemonEnv, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5).read()
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize(
    ("kind", "announced", "found"),
    [("dialplan", (980, 2980), (1000, 3000)), ("api", (1000, 2999), (500, 2500))],
)
def test_captured_masked_call_is_stored_with_the_span_the_audio_shows(
    daemon_env: DaemonEnv, kind: str, announced: tuple[int, int], found: tuple[int, int]
) -> None:
    daemon_env.start()
    call = MaskCall(daemon_env, kind)
    call.emit("start", "mask", "unmask", "stop")
    rec = daemon_env.wait_status(call.path, "stored")
    assert rec.mask_verified is True
    (span,) = rec.mask_spans
    assert (span["announced_start_ms"], span["announced_end_ms"]) == announced
    assert (span["start_ms"], span["end_ms"]) == found
    assert span["silent"] is True and span["via"] == kind and span["open_at_stop"] is False
    assert daemon_env.decrypt(rec) == call.wav
    # Counted once the job finishes (just after the row is committed).
    daemon_env.wait(
        lambda: metric(daemon_env, 'fsrecrypt_mask_verdicts_total{verdict="verified"}') == 1,
        what="the verified-mask counter",
    )


def test_forged_mask_over_tone_is_flagged_stored_and_alerted_until_acknowledged(
    daemon_env: DaemonEnv,
) -> None:
    daemon_env.start(pci={"require_verified_mask_tenants": [daemon_env.tenant]})
    call = MaskCall(daemon_env, "dialplan")
    start_us = int(
        parse_event_body(split_frame(call.frame("start"))[1]).get("Event-Date-Timestamp")
    )
    # The mask says 3.1-3.9 s: the file has tone there (its silence is at 1-3 s).
    call.frames[1] = call.frame("mask", **{"Event-Date-Timestamp": str(start_us + 3_100_000)})
    call.frames[2] = call.frame("unmask", **{"Event-Date-Timestamp": str(start_us + 3_900_000)})
    call.emit("start", "mask", "unmask", "stop")
    rec = daemon_env.wait_status(call.path, "stored")
    assert rec.mask_verified is False
    assert [s["silent"] for s in rec.mask_spans] == [False]
    assert daemon_env.decrypt(rec) == call.wav  # never lose audio
    daemon_env.wait(
        lambda: any(
            line.get("event") == "recording.mask_unverified" and line.get("alert") is True
            for line in daemon_env.log_lines()
        ),
        what="the unverified-mask log line",
    )
    assert metric(daemon_env, 'fsrecrypt_mask_verdicts_total{verdict="unverified"}') == 1
    config = daemon_env.config(pci={"require_verified_mask_tenants": [daemon_env.tenant]})
    with pytest.raises(InvalidState, match="1 stored recording"):
        check_masks(config, daemon_env.services())
    # Not required for this tenant: no alert.
    other = daemon_env.config(pci={"require_verified_mask_tenants": ["someone-else"]})
    assert check_masks(other, daemon_env.services()) == "no unacknowledged unverified mask"
    cfg_path = daemon_env.tmp / "ack.toml"
    shutil.copy(daemon_env.tmp / "fsrecrypt.toml", cfg_path)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsrecrypt",
            "-c",
            str(cfg_path),
            "recordings",
            "ack-mask",
            rec.id,
            "--note",
            "listened: agent forgot to unmask",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert check_masks(config, daemon_env.services()) == "no unacknowledged unverified mask"
    acked = daemon_env.services().db.recording(rec.id)
    assert acked.mask_ack_at is not None
    # The spans and the verdict are in the hash-chained log, and so in `audit export`.
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsrecrypt",
            "-c",
            str(cfg_path),
            "audit",
            "export",
            "--tenant",
            daemon_env.tenant,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert export.returncode == 0, export.stderr
    rows = [json.loads(line) for line in export.stdout.splitlines()]
    (encrypt,) = [r for r in rows if r["action"] == "encrypt" and r["recording_id"] == rec.id]
    assert encrypt["details"]["mask"]["verified"] is False
    (span,) = encrypt["details"]["mask"]["spans"]
    assert (span["announced_start_ms"], span["announced_end_ms"], span["silent"]) == (
        3100,
        3900,
        False,
    )
    (ack,) = [r for r in rows if r["action"] == "ack-mask"]
    assert ack["recording_id"] == rec.id and "forgot" in ack["details"]["note"]
    # And in the recording's chain of custody.
    from fsrecrypt.lifecycle.custody import recording_custody

    doc = recording_custody(daemon_env.services(), rec.id, user_id="auditor")
    assert doc["pci_mask"]["verified"] is False and doc["pci_mask"]["acknowledged_at"]
    assert doc["pci_mask"]["spans"] == rec.mask_spans


def test_mask_open_at_record_stop_runs_to_the_end(daemon_env: DaemonEnv) -> None:
    dialplan = (MASK_DIR / "dialplan_mask.wav").read_bytes()
    # tone for the first second, then silence to the end (no unmask).
    wav = dialplan[: 44 + 16000] + b"\x00" * (len(dialplan) - 44 - 16000)
    daemon_env.start()
    call = MaskCall(daemon_env, "dialplan", wav=wav)
    call.emit("start", "mask", "stop")
    rec = daemon_env.wait_status(call.path, "stored")
    assert rec.mask_verified is True
    (span,) = rec.mask_spans
    assert span["open_at_stop"] is True and span["announced_end_ms"] is None
    assert (span["start_ms"], span["end_ms"]) == (1000, 4000)


def test_sigkill_between_mask_and_record_stop_keeps_the_span(daemon_env: DaemonEnv) -> None:
    first = daemon_env.start()
    call = MaskCall(daemon_env, "api")
    call.emit("start", "mask")
    daemon_env.wait(lambda: marks_in_db(daemon_env) == 1, what="the mask in PostgreSQL")
    first.kill9()
    daemon_env.start()
    call.emit("unmask", "stop")
    rec = daemon_env.wait_status(call.path, "stored")
    assert rec.mask_verified is True
    assert [(s["start_ms"], s["end_ms"]) for s in rec.mask_spans] == [(500, 2500)]


def test_daemon_is_sent_only_the_filtered_events(daemon_env: DaemonEnv) -> None:
    daemon_env.start()
    call = MaskCall(daemon_env, "dialplan")
    frames = mask_frames()
    unrelated = [frames[i] for i in (0, 2, 7, 8, 9, 26, 34)]  # answer, set, playback, API...
    emit(daemon_env, *unrelated)
    call.emit("start", "mask", "unmask", "stop")
    daemon_env.wait_status(call.path, "stored")
    time.sleep(2.5)  # the daemon's liveness "api status" fires API events every second
    sent = daemon_env.esl.call("sent_events")
    received = [name for conn in sent for name in conn]
    assert received == [
        "RECORD_START",
        "CHANNEL_EXECUTE record_session_mask",
        "CHANNEL_EXECUTE record_session_unmask",
        "RECORD_STOP",
    ]
    subs = [c for c in daemon_env.esl.call("received") if c["line"].startswith("filter")]
    assert len(subs) == 5


def test_hostile_mask_events_are_refused_and_harmless(daemon_env: DaemonEnv) -> None:
    daemon_env.start()
    call = MaskCall(daemon_env, "api")
    call.emit("start")
    mask = call.frame("mask")
    hostile: list[dict[str, Any]] = [
        {"Event-Date-Timestamp": "-1796176444995870"},
        {"Event-Date-Timestamp": "9" * 400},
        {"Event-Date-Timestamp": "١٧٩٦١٧٦٤٤٤٩٩٥٨٧٠"},  # Arabic-Indic digits
        {"Event-Date-Timestamp": None},
        {"API-Command-Argument": f"{call.channel} mask"},
        {"API-Command-Argument": f"{call.channel} mask {call.path}\x00.wav"},
        {"API-Command-Argument": f"\u202e{call.channel} mask {call.path}"},
        {"API-Command-Argument": f"{uuid.uuid4()} mask {call.path}"},  # unknown channel
        {"API-Command-Argument": f"{call.channel} mask /etc/passwd"},  # unknown recording
        {"Core-UUID": None},
    ]
    emit(daemon_env, *(build_event_frame(mask, h) for h in hostile))
    # Thousands of marks for the real recording: kept up to the cap, stored, verified.
    flood = [call.frame("mask"), call.frame("unmask")] * 1500
    emit(daemon_env, *flood)
    daemon_env.wait(lambda: marks_in_db(daemon_env) == 3000, timeout=120, what="3000 marks")
    call.emit("stop")
    rec = daemon_env.wait_status(call.path, "stored", timeout=120)
    # 1500 identical mask/unmask pairs are one span (same instants), found in the audio.
    assert rec.mask_verified is True
    assert [(s["start_ms"], s["end_ms"]) for s in rec.mask_spans] == [(500, 2500)]
    assert metric(daemon_env, 'fsrecrypt_refused_events_total{reason="bad-mask-event"}') == 8
    assert (
        metric(daemon_env, 'fsrecrypt_refused_events_total{reason="mask-unknown-recording"}') == 2
    )
    # Counted each, logged once per 10 s per reason (a loop of made-up API commands
    # must not flood the journal).
    logged = [
        line
        for line in daemon_env.log_lines()
        if line.get("event") == "event.refused" and line.get("reason") == "bad-mask-event"
    ]
    assert len(logged) == 1 and logged[0]["suppressed_since_last"] == 0
    assert daemon_env.daemons[-1].alive()


def test_record_stop_missed_while_down_sweep_still_applies_the_open_mask(
    daemon_env: DaemonEnv,
) -> None:
    """Killed after the mask; RECORD_STOP came while it was down: the sweep adopts the
    file, and the span (still open in PostgreSQL) runs to the end of it."""
    dialplan = (MASK_DIR / "dialplan_mask.wav").read_bytes()
    wav = dialplan[: 44 + 16000] + b"\x00" * (len(dialplan) - 44 - 16000)
    first = daemon_env.start()
    call = MaskCall(daemon_env, "dialplan", wav=wav)
    call.emit("start", "mask")
    daemon_env.wait(lambda: marks_in_db(daemon_env) == 1, what="the mask in PostgreSQL")
    first.kill9()
    call.path.write_bytes(wav)  # FreeSWITCH finished the file; nobody heard its RECORD_STOP
    daemon_env.start()
    rec = daemon_env.wait_status(call.path, "stored", timeout=60)
    assert rec.mask_verified is True
    (span,) = rec.mask_spans
    assert span["open_at_stop"] is True and (span["start_ms"], span["end_ms"]) == (1000, 4000)
