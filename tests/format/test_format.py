"""Unit and property tests of fsrecrypt.format (no SDK, no vectors: see the sibling files)."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc

import pytest
from aws_encryption_sdk.internal.formatting.encryption_context import (
    serialize_encryption_context as sdk_serialize_context,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsrecrypt import format as fmt
from fsrecrypt.errors import (
    AuthenticationFailed,
    CommitmentMismatch,
    InvalidState,
    MalformedMessage,
    RangeNotSatisfiable,
    TruncatedMessage,
    UnsupportedAlgorithmSuite,
)
from fsrecrypt.format.header import _parse_context

KEY = bytes(range(32))
EDKS = [fmt.EncryptedDataKey("fsrecrypt-local", b"tenant-a\x00\x00\x00\x80", b"\x01" * 48)]
CTX = {"tenant": "acme", "recording": "r-1"}
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class ShortReads(io.RawIOBase):
    """A stream that hands out at most ``step`` bytes per call (like a socket)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def, override]
        n = min(len(buf), self._step, len(self._data) - self._pos)
        buf[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class ReadOnly:
    """A source with only read() (no readinto), returning short reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self._buf = io.BytesIO(data)
        self._step = step

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(min(n, self._step) if n >= 0 else self._step)


class Zeros:
    """``size`` zero bytes, generated on demand (the test never holds them all)."""

    def __init__(self, size: int) -> None:
        self._left = size

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buf), self._left)
        buf[:n] = bytes(n)
        self._left -= n
        return n

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return bytes(n)


def encrypt(
    plaintext: bytes, frame_length: int = 4096, ctx: dict[str, str] | None = None
) -> tuple[bytes, fmt.Encryptor]:
    enc = fmt.Encryptor(KEY, EDKS, CTX if ctx is None else ctx, frame_length=frame_length)
    return b"".join(enc.stream(io.BytesIO(plaintext))), enc


def decrypt(ciphertext: bytes) -> bytes:
    return b"".join(fmt.decrypt_stream(io.BytesIO(ciphertext), lambda h: KEY))


def read_range(ciphertext: bytes, start: int, end: int | None, chunk: int = 1000) -> bytes:
    header = fmt.parse_header(ciphertext)
    key = fmt.verify_header(header, KEY)
    plan = fmt.plan_range(header, len(ciphertext), start, end)
    part = ciphertext[plan.ciphertext_start : plan.ciphertext_end]
    chunks = [part[i : i + chunk] for i in range(0, len(part), chunk)]
    return b"".join(fmt.decrypt_range(header, key, plan, chunks, len(ciphertext)))


# --- encryption context ---------------------------------------------------------------


def test_serialize_context_layout() -> None:
    assert fmt.serialize_context({}) == b""
    out = fmt.serialize_context({"b": "2", "a": "1"})
    assert out == b"\x00\x02" + b"\x00\x01a\x00\x011" + b"\x00\x01b\x00\x012"
    # Sorted by UTF-8 bytes, not by code point order of str comparison quirks.
    keys = list(fmt.parse_header(encrypt(b"", ctx={"é": "", "z": "", "Z": ""})[0]).raw)
    assert keys  # header parses
    ser = fmt.serialize_context({"é": "x", "z": "y", "Z": "w"})
    assert ser.index(b"Z") < ser.index(b"z") < ser.index("é".encode())


@pytest.mark.parametrize(
    "ctx",
    [
        {"aws-crypto-public-key": "x"},
        {"aws-crypto-anything": "x"},
        {"k": "v" * 65536},
        {f"k{i}": "v" * 100 for i in range(700)},
        {b"bytes": "x"},
        {"x": 1},
        {"\udc80": "lone surrogate"},
    ],
)
def test_serialize_context_rejects(ctx: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(MalformedMessage):
        fmt.serialize_context(ctx)


@PROPS
@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=30), max_size=8))
def test_serialize_context_matches_sdk(ctx: dict[str, str]) -> None:
    ctx = {k: v for k, v in ctx.items() if not k.startswith("aws-crypto-")}
    try:
        expected = sdk_serialize_context(ctx)
    except Exception:  # surrogates the SDK cannot encode: we must refuse them too
        with pytest.raises(MalformedMessage):
            fmt.serialize_context(ctx)
        return
    assert fmt.serialize_context(ctx) == expected
    if ctx:
        assert _parse_context(expected) == ctx


# --- header ------------------------------------------------------------------------------


def test_build_parse_verify_header() -> None:
    mid = bytes(range(32))
    header = fmt.build_header(KEY, EDKS, CTX, 8192, message_id=mid)
    assert header.message_id == mid
    assert header.suite_id == fmt.SUITE_ID == 0x0478
    assert header.frame_length == 8192 and header.content_type == 2
    assert (
        header.size
        == len(header.raw)
        == 92
        + len(fmt.serialize_context(CTX))
        + sum(6 + len(e.provider_id) + len(e.provider_info) + len(e.ciphertext) for e in EDKS)
    )
    assert fmt.parse_header(header.raw + b"more") == header
    content_key, commitment = fmt.derive_keys(KEY, mid)
    assert header.commitment_key == commitment
    assert fmt.verify_header(header, KEY) == content_key
    assert content_key != commitment and len(content_key) == 32
    # Deterministic given key and id (the ESDK's HKDF parameters).
    assert fmt.build_header(KEY, EDKS, CTX, 8192, message_id=mid) == header
    # A fresh random id each time otherwise.
    assert (
        fmt.build_header(KEY, EDKS, CTX).message_id != fmt.build_header(KEY, EDKS, CTX).message_id
    )


def test_verify_header_failures_name_no_key_material() -> None:
    header = fmt.build_header(KEY, EDKS, CTX)
    other = os.urandom(32)
    with pytest.raises(CommitmentMismatch) as info:
        fmt.verify_header(header, other)
    text = str(info.value) + info.value.one_line()
    for secret in (other, KEY, *fmt.derive_keys(other, header.message_id)):
        assert secret.hex() not in text
    assert header.message_id.hex() in text
    bad_tag = fmt.parse_header(header.raw[:-1] + bytes([header.raw[-1] ^ 1]))
    with pytest.raises(AuthenticationFailed):
        fmt.verify_header(bad_tag, KEY)
    with pytest.raises(CommitmentMismatch):
        fmt.verify_header(header, KEY[:16])


def test_parse_header_truncated_at_every_length() -> None:
    header = fmt.build_header(KEY, EDKS, CTX)
    for n in range(header.size):
        with pytest.raises(TruncatedMessage):
            fmt.parse_header(header.raw[:n])
        with pytest.raises(TruncatedMessage):
            fmt.read_header(io.BytesIO(header.raw[:n]))


@pytest.mark.parametrize(
    ("prefix", "suite"),
    [(b"\x02\x05\x78", "0x0578"), (b"\x02\x01\x78", "0x0178"), (b"\x01\x80\x00\x14", "0x0014")],
)
def test_unsupported_suites(prefix: bytes, suite: str) -> None:
    data = prefix + bytes(200)
    for call in (lambda: fmt.parse_header(data), lambda: fmt.read_header(io.BytesIO(data))):
        with pytest.raises(UnsupportedAlgorithmSuite) as info:
            call()
        assert "unsupported algorithm suite" in str(info.value)
        assert suite in str(info.value)


def _with(raw: bytes, offset: int, new: bytes) -> bytes:
    return raw[:offset] + new + raw[offset + len(new) :]


def test_parse_header_rejects_malformed_fields() -> None:
    header = fmt.build_header(KEY, EDKS, {})
    raw = header.raw
    tail = header.size - 53  # content type offset
    with pytest.raises(MalformedMessage, match="version"):
        fmt.parse_header(b"\x03" + raw[1:])
    with pytest.raises(MalformedMessage, match="content type"):
        fmt.parse_header(_with(raw, tail, b"\x03"))
    with pytest.raises(MalformedMessage, match="frame length"):
        fmt.parse_header(_with(raw, tail + 1, struct.pack(">I", 0)))
    with pytest.raises(MalformedMessage, match="frame length"):
        fmt.parse_header(_with(raw, tail + 1, struct.pack(">I", 2**31)))
    with pytest.raises(MalformedMessage, match="non-framed"):
        fmt.parse_header(_with(raw, tail, b"\x01"))
    # Zero EDKs.
    no_edks = raw[:35] + b"\x00\x00" + b"\x00\x00" + raw[tail:]
    with pytest.raises(MalformedMessage, match="no encrypted data keys"):
        fmt.parse_header(no_edks)

    def with_context(ser: bytes) -> bytes:
        return raw[:35] + struct.pack(">H", len(ser)) + ser + raw[37:]

    dup = b"\x00\x02" + (b"\x00\x01a\x00\x01b") * 2
    with pytest.raises(MalformedMessage, match="repeats"):
        fmt.parse_header(with_context(dup))
    with pytest.raises(MalformedMessage, match="after its last pair"):
        fmt.parse_header(with_context(b"\x00\x01\x00\x01a\x00\x01bX"))
    with pytest.raises(MalformedMessage, match="inside a pair"):
        fmt.parse_header(with_context(b"\x00\x02\x00\x01a\x00\x01b"))
    with pytest.raises(MalformedMessage, match="UTF-8"):
        fmt.parse_header(with_context(b"\x00\x01\x00\x01\xff\x00\x01b"))
    pk = b"aws-crypto-public-key"
    with pytest.raises(MalformedMessage, match="public key"):
        fmt.parse_header(with_context(b"\x00\x01" + struct.pack(">H", len(pk)) + pk + b"\x00\x01b"))
    # Accepted: unsorted pairs (the tag covers bytes as written).
    unsorted = b"\x00\x02\x00\x01b\x00\x011\x00\x01a\x00\x012"
    assert fmt.parse_header(with_context(unsorted)).encryption_context == {"b": "1", "a": "2"}


def test_read_header_does_not_over_read() -> None:
    ciphertext, enc = encrypt(os.urandom(10000))
    src = io.BytesIO(ciphertext)
    assert fmt.read_header(src) == enc.header
    assert src.tell() == enc.header.size
    assert fmt.read_header(ShortReads(ciphertext, 3)) == enc.header
    assert fmt.read_header(ReadOnly(ciphertext, 5)) == enc.header  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [b"", b"\x00" * 31, b"\x00" * 33])
def test_build_header_rejects_bad_message_id(bad: bytes) -> None:
    with pytest.raises(MalformedMessage):
        fmt.build_header(KEY, EDKS, CTX, message_id=bad)


def test_build_header_rejects_bad_edks() -> None:
    with pytest.raises(MalformedMessage):
        fmt.build_header(KEY, [], CTX)
    with pytest.raises(MalformedMessage):
        fmt.build_header(KEY, [fmt.EncryptedDataKey("p", bytes(70000), b"")], CTX)


def test_rewrap_header_keeps_frames_valid() -> None:
    plaintext = os.urandom(3 * 4096 + 11)
    ciphertext, enc = encrypt(plaintext)
    new_edks = [fmt.EncryptedDataKey("aws-kms", b"arn:aws:kms:eu-west-1:1:key/k", os.urandom(180))]
    new = fmt.rewrap_header(enc.header, KEY, new_edks)
    assert new.encrypted_data_keys == tuple(new_edks)
    assert (new.message_id, new.encryption_context, new.frame_length, new.commitment_key) == (
        enc.header.message_id,
        enc.header.encryption_context,
        enc.header.frame_length,
        enc.header.commitment_key,
    )
    assert new.auth_tag != enc.header.auth_tag
    assert fmt.verify_header(new, KEY) == fmt.verify_header(enc.header, KEY)
    rewritten = new.raw + ciphertext[enc.header.size :]
    assert decrypt(rewritten) == plaintext
    assert read_range(rewritten, 5000, 9000) == plaintext[5000:9000]
    with pytest.raises(CommitmentMismatch):
        fmt.rewrap_header(enc.header, os.urandom(32), new_edks)


# --- encryptor ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -4096, 100, 4095, 4097, 2**31, True, 4096.0, "4096"])
def test_encryptor_rejects_bad_frame_lengths(bad: object) -> None:
    with pytest.raises(MalformedMessage, match="frame length"):
        fmt.Encryptor(KEY, EDKS, CTX, frame_length=bad)  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage, match="frame length"):
        fmt.build_header(KEY, EDKS, CTX, bad)  # type: ignore[arg-type]


def test_encryptor_stream_is_single_use() -> None:
    enc = fmt.Encryptor(KEY, EDKS, CTX)
    list(enc.stream(io.BytesIO(b"abc")))
    with pytest.raises(InvalidState):
        enc.stream(io.BytesIO(b"abc"))
    assert KEY.hex() not in repr(enc)


def test_empty_input_is_one_empty_final_frame() -> None:
    ciphertext, enc = encrypt(b"")
    body = ciphertext[enc.header.size :]
    assert len(body) == 40
    marker, seq, iv, length = struct.unpack(">II12sI", body[:24])
    assert (marker, seq, iv, length) == (0xFFFFFFFF, 1, bytes(11) + b"\x01", 0)
    assert decrypt(ciphertext) == b""
    assert (enc.plaintext_length, enc.ciphertext_length) == (0, len(ciphertext))


def test_exact_multiple_ends_with_empty_final_frame() -> None:
    plaintext = os.urandom(2 * 4096)
    ciphertext, enc = encrypt(plaintext)
    chunks = list(fmt.Encryptor(KEY, EDKS, CTX, 4096).stream(io.BytesIO(plaintext)))
    assert [len(c) for c in chunks] == [enc.header.size, 4128, 4128, 40]
    assert all(isinstance(c, bytes) for c in chunks)
    first = ciphertext[enc.header.size :][:16]
    assert first == struct.pack(">I", 1) + bytes(8) + struct.pack(">I", 1)
    final = ciphertext[-40:]
    assert struct.unpack(">II12sI", final[:24]) == (
        0xFFFFFFFF,
        3,
        bytes(8) + b"\x00\x00\x00\x03",
        0,
    )
    assert decrypt(ciphertext) == plaintext


def _full_length_final_frame_message(plaintext: bytes, frame_length: int) -> bytes:
    """What another ESDK may write for an exact multiple: the last frame is the final one."""
    header = fmt.build_header(KEY, EDKS, CTX, frame_length)
    aes = AESGCM(fmt.derive_keys(KEY, header.message_id)[0])
    frames = [plaintext[i : i + frame_length] for i in range(0, len(plaintext), frame_length)]
    out = [header.raw]
    mid = header.message_id
    for seq, chunk in enumerate(frames, 1):
        iv = bytes(8) + struct.pack(">I", seq)
        if seq < len(frames):
            aad = mid + b"AWSKMSEncryptionClient Frame" + struct.pack(">IQ", seq, len(chunk))
            out.append(struct.pack(">I", seq) + iv + aes.encrypt(iv, chunk, aad))
        else:
            aad = mid + b"AWSKMSEncryptionClient Final Frame" + struct.pack(">IQ", seq, len(chunk))
            out.append(
                struct.pack(">II", 0xFFFFFFFF, seq)
                + iv
                + struct.pack(">I", len(chunk))
                + aes.encrypt(iv, chunk, aad)
            )
    return b"".join(out)


def test_full_length_final_frame_is_accepted() -> None:
    plaintext = os.urandom(3 * 4096)
    ciphertext = _full_length_final_frame_message(plaintext, 4096)
    header = fmt.parse_header(ciphertext)
    assert decrypt(ciphertext) == plaintext
    assert fmt.plaintext_size(header, len(ciphertext)) == len(plaintext)
    for start, end in [(0, None), (4096, None), (2 * 4096 + 1, None), (100, 5000), (9000, 9001)]:
        assert read_range(ciphertext, start, end) == plaintext[start:end]


@PROPS
@given(
    data=st.binary(max_size=3 * 4096 + 50),
    frames=st.sampled_from([4096, 8192]),
    step=st.integers(1, 5000),
    ctx=st.sampled_from([{}, CTX]),
)
def test_roundtrip_property(data: bytes, frames: int, step: int, ctx: dict[str, str]) -> None:
    enc = fmt.Encryptor(KEY, EDKS, ctx, frame_length=frames)
    chunks = list(enc.stream(ShortReads(data, step)))  # type: ignore[arg-type]
    ciphertext = b"".join(chunks)
    assert len(chunks) == 1 + len(data) // frames + 1
    assert enc.plaintext_length == len(data)
    assert enc.ciphertext_length == len(ciphertext)
    assert len(ciphertext) == fmt.ciphertext_size(len(data), enc.header.size, frames)
    assert fmt.plaintext_size(enc.header, len(ciphertext)) == len(data)
    assert decrypt(ciphertext) == data
    assert b"".join(fmt.decrypt_stream(ShortReads(ciphertext, step), lambda h: KEY)) == data  # type: ignore[arg-type]
    assert b"".join(fmt.decrypt_stream(ReadOnly(ciphertext, step), lambda h: KEY)) == data  # type: ignore[arg-type]
    # A read()-only plaintext source produces the same message for the same id.
    again = fmt.Encryptor(KEY, EDKS, ctx, frames, message_id=enc.header.message_id)
    assert b"".join(again.stream(ReadOnly(data, step))) == ciphertext  # type: ignore[arg-type]


def test_plaintext_size_inconsistent_object_sizes() -> None:
    header = fmt.build_header(KEY, EDKS, CTX, 4096)
    h = header.size
    for size in [0, h, h + 39]:
        with pytest.raises(MalformedMessage):
            fmt.plaintext_size(header, size)
    for r in range(4097, 4096 + 32):
        with pytest.raises(MalformedMessage, match="inconsistent"):
            fmt.plaintext_size(header, h + 40 + r)
    assert fmt.plaintext_size(header, h + 40) == 0
    assert fmt.plaintext_size(header, h + 40 + 4096) == 4096
    assert fmt.plaintext_size(header, h + 40 + 4128) == 4096


# --- random access ----------------------------------------------------------------------------


def _expected_span(
    header: fmt.Header, size: int, total: int, start: int, end: int
) -> tuple[int, int]:
    """The minimal frame run: frames holding [start, end), plus the final frame at the end."""
    f = header.frame_length
    stride = f + 32
    first = start // f + 1
    ct_start = header.size + (first - 1) * stride
    if total == 0:
        return header.size, size
    if end == start:
        return ct_start, ct_start
    if end == total:
        return ct_start, size
    last = (end - 1) // f + 1
    final_seq = (size - header.size - 40) // stride + 1
    return ct_start, size if last == final_seq else header.size + last * stride


MESSAGES = {}
for _n in [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 77]:
    _pt = os.urandom(_n)
    MESSAGES[_n] = (_pt, encrypt(_pt)[0])


@PROPS
@given(
    size=st.sampled_from(sorted(MESSAGES)),
    a=st.integers(0, 3 * 4096 + 80),
    b=st.integers(0, 3 * 4096 + 80) | st.none(),
    chunk=st.integers(1, 9000),
)
def test_range_property(size: int, a: int, b: int | None, chunk: int) -> None:
    plaintext, ciphertext = MESSAGES[size]
    header = fmt.parse_header(ciphertext)
    start, end = (a, b) if b is None or a <= b else (b, a)
    if start >= size and not (size == 0 and start == 0):
        with pytest.raises(RangeNotSatisfiable):
            fmt.plan_range(header, len(ciphertext), start, end)
        return
    plan = fmt.plan_range(header, len(ciphertext), start, end)
    eff_end = size if end is None else min(end, size)
    assert (plan.start, plan.end, plan.length) == (start, eff_end, eff_end - start)
    assert (plan.ciphertext_start, plan.ciphertext_end) == _expected_span(
        header, len(ciphertext), size, start, eff_end
    )
    assert plan.first_sequence == start // 4096 + 1
    assert plan.skip == start % 4096
    assert read_range(ciphertext, start, end, chunk) == plaintext[start:end]


def test_range_errors() -> None:
    plaintext, ciphertext = MESSAGES[3 * 4096 + 77]
    header = fmt.parse_header(ciphertext)
    size = len(ciphertext)
    for start, end in [(-1, None), (len(plaintext), None), (10**9, None), (10, 5)]:
        with pytest.raises(RangeNotSatisfiable):
            fmt.plan_range(header, size, start, end)
    with pytest.raises(MalformedMessage, match="inconsistent"):
        fmt.plan_range(header, size + (4096 - 77) + 1, 0, None)
    # Empty message: only [0, ...) is satisfiable, and it proves emptiness via the final frame.
    _, empty = MESSAGES[0]
    eh = fmt.parse_header(empty)
    plan = fmt.plan_range(eh, len(empty), 0, None)
    assert (plan.length, plan.ciphertext_start, plan.ciphertext_end) == (0, eh.size, len(empty))
    assert read_range(empty, 0, None) == b""
    assert read_range(empty, 0, 0) == b""
    with pytest.raises(RangeNotSatisfiable):
        fmt.plan_range(eh, len(empty), 1, None)


def test_range_reads_only_needed_frames() -> None:
    """decrypt_range never needs bytes outside the plan: feed it nothing else."""
    plaintext, ciphertext = MESSAGES[3 * 4096 + 77]
    header = fmt.parse_header(ciphertext)
    key = fmt.verify_header(header, KEY)
    plan = fmt.plan_range(header, len(ciphertext), 4096 + 5, 4096 + 10)
    assert plan.ciphertext_end - plan.ciphertext_start == 4096 + 32  # one frame
    part = ciphertext[plan.ciphertext_start : plan.ciphertext_end]
    got = list(fmt.decrypt_range(header, key, plan, iter([part]), len(ciphertext)))
    assert b"".join(got) == plaintext[4096 + 5 : 4096 + 10]
    plan = fmt.plan_range(header, len(ciphertext), 4096 - 1, 4096 + 1)
    assert plan.ciphertext_end - plan.ciphertext_start == 2 * (4096 + 32)  # two frames


# --- memory ---------------------------------------------------------------------------------------


def test_encrypt_memory_is_bounded_by_a_few_frames() -> None:
    size = 64 * 1024 * 1024
    frame = fmt.DEFAULT_FRAME_LENGTH
    enc = fmt.Encryptor(KEY, EDKS, CTX)
    tracemalloc.start()
    try:
        total = 0
        for chunk in enc.stream(Zeros(size)):  # type: ignore[arg-type]
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == enc.ciphertext_length == fmt.ciphertext_size(size, enc.header.size, frame)
    assert enc.plaintext_length == size
    assert peak < 5 * frame, f"peak {peak} bytes"


def test_decrypt_memory_is_bounded_by_a_few_frames() -> None:
    frame = fmt.DEFAULT_FRAME_LENGTH
    enc = fmt.Encryptor(KEY, EDKS, CTX)
    ciphertext = b"".join(enc.stream(Zeros(8 * 1024 * 1024)))  # type: ignore[arg-type]
    src = io.BytesIO(ciphertext)
    tracemalloc.start()
    try:
        for _ in fmt.decrypt_stream(src, lambda h: KEY):
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * frame, f"peak {peak} bytes"
