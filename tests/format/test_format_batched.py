"""decrypt_stream_batched: same plaintext and same refusals as decrypt_stream.

The batched reader hands decryption to a pool (here a real thread pool and
an inline runner) in batches of frames. It must agree with the strict
streaming reader on every message shape and batch size, and under every
kind of tampering it must raise a typed error without ever releasing the
plaintext of the failed frame or of anything after it.
"""

from __future__ import annotations

import io
import os
import random
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from fsrecrypt import format as fmt
from fsrecrypt.errors import (
    AuthenticationFailed,
    CommitmentMismatch,
    FormatError,
    InvalidState,
    MalformedMessage,
    TrailingData,
    TruncatedMessage,
)

F = 4096
STRIDE = F + fmt.REGULAR_FRAME_OVERHEAD
DATA_KEY = bytes(range(7, 39))
CTX = {"tenant_id": "t-1", "recording_id": "r-1"}
EDKS = [fmt.EncryptedDataKey("fsrecrypt-local", b"k" * 8, os.urandom(48))]
POOL = ThreadPoolExecutor(max_workers=3)


Job = Callable[[], tuple[bytes, BaseException | None]]


def threaded(job: Job) -> Job:
    return POOL.submit(job).result


def inline(job: Job) -> Job:
    result = job()
    return lambda: result


def message(size: int) -> tuple[bytes, bytes, fmt.Header]:
    plaintext = random.Random(size).randbytes(size)
    enc = fmt.Encryptor(DATA_KEY, EDKS, CTX, frame_length=F)
    return plaintext, b"".join(enc.stream(io.BytesIO(plaintext))), enc.header


def run(
    ciphertext: bytes,
    *,
    batch_bytes: int = 3 * STRIDE,
    depth: int = 2,
    submit: Callable[[Job], Job] = threaded,
    key: bytes = DATA_KEY,
) -> tuple[list[bytes], BaseException | None]:
    """The chunks released before the error (if any) and the error."""
    out: list[bytes] = []
    it: Iterator[bytes] = fmt.decrypt_stream_batched(
        io.BytesIO(ciphertext), lambda _h: key, submit, batch_bytes=batch_bytes, depth=depth
    )
    try:
        for chunk in it:
            out.append(chunk)
    except FormatError as exc:
        return out, exc
    return out, None


def strict(ciphertext: bytes) -> tuple[bytes, type | None]:
    """What decrypt_stream releases from the same bytes, and its error type."""
    out = bytearray()
    try:
        for chunk in fmt.decrypt_stream(io.BytesIO(ciphertext), lambda _h: DATA_KEY):
            out += chunk
    except FormatError as exc:
        return bytes(out), type(exc)
    return bytes(out), None


def same_as_strict(ciphertext: bytes, **kwargs: object) -> BaseException | None:
    """Assert the batched reader releases exactly what decrypt_stream does, same error."""
    chunks, error = run(ciphertext, **kwargs)  # type: ignore[arg-type]
    released, error_type = strict(ciphertext)
    assert b"".join(chunks) == released
    assert type(error) is error_type, (error, error_type)
    return error


# Sizes around batch and frame boundaries, with a final frame that is empty,
# short, full (F) and long enough to reach past the last regular slot.
SIZES = [0, 1, F - 1, F, F + 1, 3 * F, 3 * F + 1, 3 * F + F - 3, 6 * F, 7 * F + 5, 20 * F + 77]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch_frames", [1, 2, 3, 64])
def test_same_plaintext_as_decrypt_stream(size: int, batch_frames: int) -> None:
    plaintext, ciphertext, _header = message(size)
    chunks, error = run(ciphertext, batch_bytes=batch_frames * STRIDE)
    assert error is None
    assert b"".join(chunks) == plaintext
    assert all(chunks) and all(len(c) <= batch_frames * F for c in chunks)
    strict = b"".join(fmt.decrypt_stream(io.BytesIO(ciphertext), lambda _h: DATA_KEY))
    assert strict == plaintext


@pytest.mark.parametrize("submit", [threaded, inline])
@pytest.mark.parametrize("depth", [1, 4])
def test_any_runner_and_depth(submit: Callable[[Job], Job], depth: int) -> None:
    plaintext, ciphertext, _header = message(9 * F + 10)
    chunks, error = run(ciphertext, submit=submit, depth=depth, batch_bytes=2 * STRIDE)
    assert error is None and b"".join(chunks) == plaintext


def _flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("frame", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("part", ["sequence", "iv", "ciphertext", "tag"])
def test_tampered_frame_is_never_released(frame: int, part: str) -> None:
    """Frame k altered: exactly frames 1..k-1 go out, then the error (as decrypt_stream)."""
    size = 7 * F + 100  # frames 1..7 regular, 8 final
    plaintext, ciphertext, header = message(size)
    start = header.size + (frame - 1) * STRIDE
    final = frame == 8
    head = 8 if final else 4  # marker + sequence number, or sequence number
    offsets = {
        "sequence": start + head - 1,
        "iv": start + head + 11,
        "ciphertext": start + head + fmt.IV_LENGTH + (4 if final else 0) + 5,
        "tag": len(ciphertext) - 1 if final else start + STRIDE - 1,
    }
    tampered = _flip(ciphertext, offsets[part])
    for batch_frames in (1, 3, 64):
        chunks, error = run(tampered, batch_bytes=batch_frames * STRIDE)
        assert isinstance(error, AuthenticationFailed | MalformedMessage), error
        assert b"".join(chunks) == plaintext[: (frame - 1) * F]
        same_as_strict(tampered, batch_bytes=batch_frames * STRIDE)


def test_truncation_anywhere_is_refused() -> None:
    _plaintext, ciphertext, header = message(5 * F + 9)
    for cut in range(header.size, len(ciphertext), 97):
        error = same_as_strict(ciphertext[:cut], batch_bytes=2 * STRIDE)
        assert isinstance(error, TruncatedMessage | MalformedMessage), cut
    # Exactly after the last regular frame: the final frame is missing.
    _chunks, error = run(ciphertext[: header.size + 5 * STRIDE])
    assert isinstance(error, TruncatedMessage)


@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 40, b"x" * (3 * STRIDE)])
@pytest.mark.parametrize("size", [3 * F, 3 * F + 200, 2 * F + F - 2])
def test_bytes_after_the_final_frame(extra: bytes, size: int) -> None:
    plaintext, ciphertext, _header = message(size)
    chunks, error = run(ciphertext + extra, batch_bytes=3 * STRIDE)
    assert isinstance(error, TrailingData)
    # The final frame's plaintext is withheld until the end was proven.
    assert b"".join(chunks) == plaintext[: size - size % F]
    same_as_strict(ciphertext + extra, batch_bytes=2 * STRIDE)


def test_reordered_frames_fail() -> None:
    _plaintext, ciphertext, header = message(4 * F + 3)
    body = ciphertext[header.size :]
    frames = [body[i * STRIDE : (i + 1) * STRIDE] for i in range(4)]
    swapped = header.raw + frames[1] + frames[0] + b"".join(frames[2:]) + body[4 * STRIDE :]
    chunks, error = run(swapped)
    assert isinstance(error, AuthenticationFailed) and chunks == []
    same_as_strict(swapped)


def test_final_frame_longer_than_frame_length() -> None:
    _plaintext, ciphertext, header = message(F + 5)
    pos = header.size + STRIDE + 4 + 4 + fmt.IV_LENGTH
    forged = ciphertext[:pos] + struct.pack(">I", F + 1) + ciphertext[pos + 4 :]
    _chunks, error = run(forged)
    assert isinstance(error, MalformedMessage)


def test_wrong_key_and_header_tamper_release_nothing() -> None:
    _plaintext, ciphertext, _header = message(2 * F)
    chunks, error = run(ciphertext, key=bytes(32))
    assert isinstance(error, CommitmentMismatch) and chunks == []
    chunks, error = run(_flip(ciphertext, 40))  # inside the encryption context
    assert error is not None and chunks == []


def test_bad_parameters_are_refused() -> None:
    _plaintext, ciphertext, _header = message(10)
    with pytest.raises(InvalidState):
        run(ciphertext, batch_bytes=0)
