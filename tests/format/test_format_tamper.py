"""Tampering, truncation, extension and reordering must fail with typed errors.

Every byte region of a multi-frame message is altered in turn (each header
field, each EDK field, commitment, header tag; each frame's sequence number,
IV, ciphertext and tag; the final frame's marker, length, ciphertext and
tag). Both readers are exercised: the strict streaming decryptor and the
random-access path (parse -> verify -> plan -> decrypt_range). The streaming
reader must never release the plaintext of a frame that did not verify.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsrecrypt import format as fmt
from fsrecrypt.errors import (
    AuthenticationFailed,
    CommitmentMismatch,
    FormatError,
    IntegrityError,
    MalformedMessage,
    TrailingData,
    TruncatedMessage,
)

F = 4096
DATA_KEY = bytes(range(100, 132))
CTX = {"tenant": "acme", "recording": "r-7"}
EDKS = [
    fmt.EncryptedDataKey("fsrecrypt-local", b"key-a" + bytes(20), os.urandom(48)),
    fmt.EncryptedDataKey("aws-kms", b"arn:aws:kms:eu-west-1:111122223333:key/x", os.urandom(60)),
]
SHAPES = {"partial-final": 3 * F + 100, "empty-final": 3 * F}


def _message(size: int) -> tuple[bytes, bytes, fmt.Header]:
    plaintext = random.Random(size).randbytes(size)
    enc = fmt.Encryptor(DATA_KEY, EDKS, CTX, frame_length=F)
    return plaintext, b"".join(enc.stream(io.BytesIO(plaintext))), enc.header


MESSAGES = {name: _message(size) for name, size in SHAPES.items()}


def regions(header: fmt.Header, size: int) -> dict[str, tuple[int, int]]:
    """Name -> (start, end) of every field of a message built by _message."""
    r: dict[str, tuple[int, int]] = {}
    pos = 0

    def field(name: str, n: int) -> None:
        nonlocal pos
        r[name] = (pos, pos + n)
        pos += n

    field("version", 1)
    field("suite", 2)
    field("message-id", 32)
    field("context-length", 2)
    field("context", len(fmt.serialize_context(CTX)))
    field("edk-count", 2)
    for i, edk in enumerate(EDKS):
        field(f"edk{i}-provider-id-length", 2)
        field(f"edk{i}-provider-id", len(edk.provider_id))
        field(f"edk{i}-provider-info-length", 2)
        field(f"edk{i}-provider-info", len(edk.provider_info))
        field(f"edk{i}-ciphertext-length", 2)
        field(f"edk{i}-ciphertext", len(edk.ciphertext))
    field("content-type", 1)
    field("frame-length", 4)
    field("commitment", 32)
    field("header-tag", 16)
    assert pos == header.size
    full, rest = divmod(size, F)
    for seq in range(1, full + 1):
        field(f"frame{seq}-sequence", 4)
        field(f"frame{seq}-iv", 12)
        field(f"frame{seq}-ciphertext", F)
        field(f"frame{seq}-tag", 16)
    field("final-marker", 4)
    field("final-sequence", 4)
    field("final-iv", 12)
    field("final-length", 4)
    if rest:
        field("final-ciphertext", rest)
    field("final-tag", 16)
    return r


CASES = [
    (shape, name, span)
    for shape, (pt, ct, header) in MESSAGES.items()
    for name, span in regions(header, len(pt)).items()
]


def _positions(start: int, end: int) -> list[int]:
    if end - start <= 48:
        return list(range(start, end))
    rng = random.Random(start)
    return sorted(
        {start, start + 1, (start + end) // 2, end - 2, end - 1, *rng.sample(range(start, end), 8)}
    )


def _flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def _stream(ciphertext: bytes) -> Iterator[bytes]:
    return fmt.decrypt_stream(io.BytesIO(ciphertext), lambda h: DATA_KEY)


def _range(obj: bytes, start: int = 0, end: int | None = None, chunk: int = 777) -> bytes:
    """The random-access path as a store-backed reader would run it."""
    header = fmt.parse_header(obj)
    content_key = fmt.verify_header(header, DATA_KEY)
    plan = fmt.plan_range(header, len(obj), start, end)
    part = obj[plan.ciphertext_start : plan.ciphertext_end]
    chunks = [part[i : i + chunk] for i in range(0, len(part), chunk)]
    return b"".join(fmt.decrypt_range(header, content_key, plan, chunks, len(obj)))


def _collect(it: Iterator[bytes]) -> tuple[list[bytes], BaseException | None]:
    got: list[bytes] = []
    try:
        for piece in it:
            got.append(piece)
    except FormatError as exc:
        return got, exc
    return got, None


def test_untampered_messages_decrypt() -> None:
    # The baseline: without this, every "raises" below could be vacuous.
    for pt, ct, _ in MESSAGES.values():
        assert b"".join(_stream(ct)) == pt
        assert _range(ct) == pt
        assert _range(ct, F - 3, 2 * F + 5) == pt[F - 3 : 2 * F + 5]


@pytest.mark.parametrize(("shape", "region", "span"), CASES, ids=[f"{s}-{n}" for s, n, _ in CASES])
def test_bit_flip_in_region(shape: str, region: str, span: tuple[int, int]) -> None:
    plaintext, ciphertext, header = MESSAGES[shape]
    for pos in _positions(*span):
        for bit in (0, 7):
            bad = _flip(ciphertext, pos, bit)
            got, exc = _collect(_stream(bad))
            assert exc is not None, f"{region}@{pos} bit {bit} was accepted by decrypt_stream"
            if pos >= header.size:
                # Body tampering is an integrity failure, never a silent success,
                # and only frames before the damaged one may have been released.
                assert isinstance(exc, IntegrityError | MalformedMessage), exc
                frame_index = (pos - header.size) // (F + 32)
                assert b"".join(got) == plaintext[: frame_index * F]
            with pytest.raises(FormatError):
                _range(bad)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_header_tampering_error_types(shape: str) -> None:
    _, ciphertext, header = MESSAGES[shape]
    r = regions(header, SHAPES[shape])
    with pytest.raises(CommitmentMismatch):
        list(_stream(_flip(ciphertext, r["message-id"][0])))
    with pytest.raises(CommitmentMismatch):
        list(_stream(_flip(ciphertext, r["commitment"][0])))
    for name in ("context", "edk0-ciphertext", "edk1-provider-info", "header-tag", "frame-length"):
        with pytest.raises(AuthenticationFailed):
            list(_stream(_flip(ciphertext, r[name][1] - 1)))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("frame", [1, 2, 3, 4])
@pytest.mark.parametrize("part", ["sequence", "iv", "ciphertext", "tag"])
def test_stream_never_releases_a_failed_frame(shape: str, frame: int, part: str) -> None:
    plaintext, ciphertext, header = MESSAGES[shape]
    r = regions(header, SHAPES[shape])
    name = f"frame{frame}-{part}" if frame <= 3 else f"final-{part}"
    if name not in r:
        name = "final-tag"  # the empty final frame has no ciphertext
    start, end = r[name]
    got, exc = _collect(_stream(_flip(ciphertext, (start + end) // 2)))
    assert isinstance(exc, AuthenticationFailed)
    assert b"".join(got) == plaintext[: (frame - 1) * F]
    assert len(got) == frame - 1
    # The range reader over frames 2..end releases nothing from the bad frame either.
    if frame >= 2:
        bad = _flip(ciphertext, (start + end) // 2)
        hdr = fmt.parse_header(bad)
        key = fmt.verify_header(hdr, DATA_KEY)
        plan = fmt.plan_range(hdr, len(bad), F + 1, None)
        part_bytes = bad[plan.ciphertext_start : plan.ciphertext_end]
        got, exc = _collect(fmt.decrypt_range(hdr, key, plan, [part_bytes], len(bad)))
        assert isinstance(exc, AuthenticationFailed)
        assert b"".join(got) == plaintext[F + 1 : (frame - 1) * F]


def _cut_points(header: fmt.Header, size: int) -> list[int]:
    body = header.size
    stride = F + 32
    full = size // F
    points = {0, 1, 2, 3, 36, 37, header.size - 17, header.size - 1, header.size}
    for k in range(full + 1):
        b = body + k * stride
        points |= {b, b + 1, b + 3, b + 4, b + 16, b + 20, b + 24, b + stride // 2}
    total = fmt.ciphertext_size(size, header.size, F)
    points |= {total - 17, total - 16, total - 1}
    return sorted(p for p in points if p < total)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_truncation_anywhere(shape: str) -> None:
    plaintext, ciphertext, header = MESSAGES[shape]
    for cut in _cut_points(header, len(plaintext)):
        bad = ciphertext[:cut]
        got, exc = _collect(_stream(bad))
        assert isinstance(exc, TruncatedMessage | AuthenticationFailed), (cut, exc)
        if cut >= header.size:
            assert isinstance(exc, TruncatedMessage), (cut, exc)
        # Frames before the cut verified and may have been released (all of
        # them when only the empty final frame is missing); the error is what
        # tells the consumer the message is incomplete.
        assert plaintext.startswith(b"".join(got))
        with pytest.raises(FormatError):
            _range(bad)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_range_chunks_short_or_long(shape: str) -> None:
    """The store returns fewer or more bytes than the planned range."""
    _, ciphertext, _ = MESSAGES[shape]
    header = fmt.parse_header(ciphertext)
    key = fmt.verify_header(header, DATA_KEY)
    for start, end in [(0, None), (10, F + 10), (2 * F, None)]:
        plan = fmt.plan_range(header, len(ciphertext), start, end)
        part = ciphertext[plan.ciphertext_start : plan.ciphertext_end]
        for cut in {1, 16, 17, F // 2, len(part) - 1}:
            with pytest.raises(TruncatedMessage):
                list(fmt.decrypt_range(header, key, plan, [part[:-cut]], len(ciphertext)))
        with pytest.raises(TrailingData):
            list(fmt.decrypt_range(header, key, plan, [part, b"\x00"], len(ciphertext)))
        # A plan for another object (or a forged one) is refused outright.
        with pytest.raises(MalformedMessage):
            forged = fmt.RangePlan(**{**plan.__dict__, "skip": plan.skip + 1})
            list(fmt.decrypt_range(header, key, forged, [part], len(ciphertext)))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 40, b"garbage after the end"])
def test_appended_bytes(shape: str, extra: bytes) -> None:
    plaintext, ciphertext, _ = MESSAGES[shape]
    got, exc = _collect(_stream(ciphertext + extra))
    assert isinstance(exc, TrailingData)
    # The final frame's plaintext is held back until the end of input was seen.
    assert b"".join(got) == plaintext[: 3 * F]
    with pytest.raises(FormatError):
        _range(ciphertext + extra)


def _frames(ciphertext: bytes, header: fmt.Header) -> list[bytes]:
    body = ciphertext[header.size :]
    stride = F + 32
    out = []
    while body[:4] != b"\xff\xff\xff\xff":
        out.append(body[:stride])
        body = body[stride:]
    out.append(body)
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reordered_duplicated_dropped_frames(shape: str) -> None:
    plaintext, ciphertext, header = MESSAGES[shape]
    frames = _frames(ciphertext, header)
    assert len(frames) == 4
    f1, f2, f3, final = frames
    variants = {
        "swap-1-2": [f2, f1, f3, final],
        "swap-2-3": [f1, f3, f2, final],
        "duplicate-2": [f1, f2, f2, f3, final],
        "drop-2": [f1, f3, final],
        "drop-final": [f1, f2, f3],
        "final-early": [f1, f2, final],
        "final-twice": [f1, f2, f3, final, final],
    }
    released = {
        "swap-1-2": 0,
        "swap-2-3": 1,
        "duplicate-2": 2,
        "drop-2": 1,
        "drop-final": 3,
        "final-early": 2,
        "final-twice": 3,
    }
    for name, parts in variants.items():
        bad = header.raw + b"".join(parts)
        got, exc = _collect(_stream(bad))
        assert isinstance(exc, IntegrityError), (name, exc)
        # Nothing from the first misplaced frame on is released.
        # (final-twice: the final frame's plaintext is held back until the
        # reader saw the end of the input, so only frames 1-3 get out.)
        assert b"".join(got) == plaintext[: released[name] * F], name
        with pytest.raises(FormatError):
            _range(bad)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_renumbered_frames_fail_authentication(shape: str) -> None:
    """An attacker rewriting sequence number and IV still fails: both are in the AAD/nonce."""
    _, ciphertext, header = MESSAGES[shape]
    f1, f2, f3, final = _frames(ciphertext, header)
    renumbered_2 = struct.pack(">I8xI", 1, 1) + f2[16:]
    renumbered_1 = struct.pack(">I8xI", 2, 2) + f1[16:]
    bad = header.raw + renumbered_2 + renumbered_1 + f3 + final
    got, exc = _collect(_stream(bad))
    assert isinstance(exc, AuthenticationFailed)
    assert got == []


@pytest.mark.parametrize("shape", list(SHAPES))
def test_frame_from_another_message_is_refused(shape: str) -> None:
    """Same data key, different message id: frames do not transplant."""
    plaintext, ciphertext, header = MESSAGES[shape]
    other = fmt.Encryptor(DATA_KEY, EDKS, CTX, frame_length=F)
    other_ct = b"".join(other.stream(io.BytesIO(plaintext)))
    ours = _frames(ciphertext, header)
    theirs = _frames(other_ct, other.header)
    bad = header.raw + ours[0] + theirs[1] + ours[2] + ours[3]
    got, exc = _collect(_stream(bad))
    assert isinstance(exc, AuthenticationFailed)
    assert b"".join(got) == plaintext[:F]


def test_final_frame_longer_than_frame_length() -> None:
    plaintext, ciphertext, header = MESSAGES["partial-final"]
    start, _ = regions(header, len(plaintext))["final-length"]
    bad = ciphertext[:start] + struct.pack(">I", F + 1) + ciphertext[start + 4 :]
    with pytest.raises(MalformedMessage, match="frame length"):
        list(_stream(bad + bytes(F)))


def test_wrong_data_key_is_a_commitment_failure() -> None:
    _, ciphertext, _ = MESSAGES["partial-final"]
    with pytest.raises(CommitmentMismatch):
        list(fmt.decrypt_stream(io.BytesIO(ciphertext), lambda h: bytes(32)))
    with pytest.raises(CommitmentMismatch):
        list(fmt.decrypt_stream(io.BytesIO(ciphertext), lambda h: bytes(16)))


# --- the non-framed body (read for interop only) ------------------------------------

VECTORS = Path(__file__).parents[1] / "fixtures" / "vectors" / "esdk-v2-commitment-vectors.json"


def _unframed_vector() -> tuple[bytes, bytes, bytes]:
    for v in json.loads(VECTORS.read_text())["tests"]:
        ct = base64.b64decode(v["ciphertext"].strip())
        if ct[1:3] == b"\x04\x78" and v["status"] and fmt.parse_header(ct).content_type == 1:
            pt = "".join(v["plaintext-frames"]).encode()
            return ct, base64.b64decode(v["decrypted-dek"]), pt
    raise AssertionError("no unframed unsigned vector")


def test_non_framed_body_tampering() -> None:
    ciphertext, key, plaintext = _unframed_vector()
    header = fmt.parse_header(ciphertext)

    def run(data: bytes) -> tuple[list[bytes], BaseException | None]:
        return _collect(fmt.decrypt_stream(io.BytesIO(data), lambda h: key))

    assert run(ciphertext) == ([plaintext], None)
    for pos in range(header.size, len(ciphertext)):
        got, exc = run(_flip(ciphertext, pos))
        assert isinstance(exc, IntegrityError | MalformedMessage), pos
        assert got == []  # authenticated before anything is released
    for cut in range(header.size, len(ciphertext)):
        got, exc = run(ciphertext[:cut])
        assert isinstance(exc, TruncatedMessage), cut
        assert got == []
    got, exc = run(ciphertext + b"\x00")
    assert isinstance(exc, TrailingData)
    with pytest.raises(MalformedMessage):
        fmt.plan_range(header, len(ciphertext), 0, None)
