"""Random access: which frames hold a plaintext byte range, and decrypting just those.

A Range request (seek in the player) becomes a :class:`RangePlan` from the
header and the object size alone, i.e. one contiguous ciphertext run that a
store fetches with a single ranged GET; :func:`decrypt_range` then
authenticates each of those frames before releasing any of its bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fsrecrypt.errors import (
    AuthenticationFailed,
    MalformedMessage,
    RangeNotSatisfiable,
)
from fsrecrypt.format.constants import (
    CONTENT_TYPE_NON_FRAMED,
    FINAL_FRAME_OVERHEAD,
    MAX_SEQUENCE_NUMBER,
    NON_FRAMED_OVERHEAD,
    REGULAR_FRAME_OVERHEAD,
)
from fsrecrypt.format.frames import _FrameReader
from fsrecrypt.format.header import Header
from fsrecrypt.format.source import _ChunkSource, _Input


@dataclass(frozen=True)
class RangePlan:
    """How to serve plaintext ``[start, end)`` from one contiguous ciphertext run.

    ``ciphertext_start``/``ciphertext_end`` are object byte offsets (end
    exclusive) covering exactly the frames that hold the range (plus the
    final frame when the range reaches the end of the plaintext, because only
    the final frame proves where the message ends). ``first_sequence`` is the
    first fetched frame's sequence number, ``skip`` the plaintext bytes to drop
    from it, and ``length`` the number of bytes to return.
    """

    start: int
    end: int
    ciphertext_start: int
    ciphertext_end: int
    first_sequence: int
    skip: int
    length: int


# --- sizes and layout ------------------------------------------------------------------------


def ciphertext_size(plaintext_length: int, header_size: int, frame_length: int) -> int:
    """Object size :class:`Encryptor` produces for this much plaintext."""
    if plaintext_length < 0 or frame_length <= 0:
        raise MalformedMessage("plaintext length must be >= 0 and frame length > 0")
    full, rest = divmod(plaintext_length, frame_length)
    return (
        header_size + full * (frame_length + REGULAR_FRAME_OVERHEAD) + rest + FINAL_FRAME_OVERHEAD
    )


def _layout(header: Header, object_size: int) -> tuple[int, int]:
    """(regular frame count, final frame content length) implied by the object size.

    The split is unique: a final frame is 40..F+40 bytes and a regular frame
    F+32, so the remainder after the regular frames identifies the final one.
    """
    if not header.framed:
        raise MalformedMessage("random access needs a framed message (content type 0x02)")
    frame_length = header.frame_length
    body = object_size - header.size
    if body < FINAL_FRAME_OVERHEAD:
        raise MalformedMessage(
            f"object size {object_size} is too small for message {header.message_id.hex()}"
        )
    regular, final_length = divmod(
        body - FINAL_FRAME_OVERHEAD, frame_length + REGULAR_FRAME_OVERHEAD
    )
    if final_length > frame_length or regular + 1 > MAX_SEQUENCE_NUMBER:
        raise MalformedMessage(
            f"object size {object_size} is inconsistent with the frame length of "
            f"message {header.message_id.hex()}"
        )
    return regular, final_length


def plaintext_size(header: Header, object_size: int) -> int:
    """Plaintext length from the object size alone (no body bytes needed)."""
    if header.content_type == CONTENT_TYPE_NON_FRAMED:
        size = object_size - header.size - NON_FRAMED_OVERHEAD
        if size < 0:
            raise MalformedMessage(f"object size {object_size} is too small for its header")
        return size
    regular, final_length = _layout(header, object_size)
    return regular * header.frame_length + final_length


def plan_range(header: Header, object_size: int, start: int, end: int | None) -> RangePlan:
    """Map plaintext ``[start, end)`` to the frames that hold it.

    ``end`` None (or past the end) means to the end of the plaintext. An
    empty message allows only ``start == 0`` and plans its single empty final
    frame, which proves the message really is empty. When the range reaches
    the end, the final frame is always included (even if empty) because only
    it proves where the message ends.
    """
    regular, final_length = _layout(header, object_size)
    frame_length = header.frame_length
    total = regular * frame_length + final_length
    if start < 0:
        raise RangeNotSatisfiable(f"range start {start} is negative")
    if end is None or end > total:
        end = total
    if end < start:
        raise RangeNotSatisfiable(f"range end {end} is before its start {start}")
    final_seq = regular + 1
    stride = frame_length + REGULAR_FRAME_OVERHEAD

    def offset(seq: int) -> int:
        return header.size + (seq - 1) * stride

    if total == 0:
        if start != 0:
            raise RangeNotSatisfiable(f"range start {start} is past the end of an empty recording")
        return RangePlan(0, 0, offset(1), object_size, 1, 0, 0)
    if start >= total:
        raise RangeNotSatisfiable(f"range start {start} is at or past the size {total}")
    first = start // frame_length + 1
    skip = start - (first - 1) * frame_length
    if end == start:
        return RangePlan(start, end, offset(first), offset(first), first, skip, 0)
    last = final_seq if end == total else (end - 1) // frame_length + 1
    ct_end = object_size if last == final_seq else offset(last + 1)
    return RangePlan(start, end, offset(first), ct_end, first, skip, end - start)


def decrypt_range(
    header: Header,
    content_key: bytes,
    plan: RangePlan,
    chunks: Iterable[bytes],
    object_size: int,
) -> Iterator[bytes]:
    """Decrypt ``plan``'s frames from ``chunks`` and yield exactly the planned plaintext.

    ``chunks`` are the bytes ``object[plan.ciphertext_start:plan.ciphertext_end]``
    in any chunking. ``content_key`` comes from :func:`verify_header`. Each
    frame is authenticated (sequence number, IV, tag) before any of its bytes
    are released; the frame that the object size says is final must be a
    final frame of the expected length, and no other may be.
    """
    expected = plan_range(header, object_size, plan.start, plan.end)
    if expected != plan:
        raise MalformedMessage(
            f"range plan does not match the layout of message {header.message_id.hex()}"
        )
    regular, final_length = _layout(header, object_size)
    final_seq = regular + 1
    stride = header.frame_length + REGULAR_FRAME_OVERHEAD
    if plan.ciphertext_end == object_size and plan.ciphertext_end > plan.ciphertext_start:
        last = final_seq
    else:
        last = plan.first_sequence + (plan.ciphertext_end - plan.ciphertext_start) // stride - 1
    src = _Input(_ChunkSource(chunks))
    frames = _FrameReader(src, header, content_key)
    skip = plan.skip
    left = plan.length
    for seq in range(plan.first_sequence, last + 1):
        plaintext, final = frames.read(seq)
        if final != (seq == final_seq) or (final and len(plaintext) != final_length):
            raise AuthenticationFailed(
                f"frame {seq} of message {header.message_id.hex()} is "
                f"{'final' if final else 'not final'} contrary to the object size"
            )
        if skip or left < len(plaintext):
            piece = plaintext[skip : skip + left]
            skip = 0
        else:
            piece = plaintext
        left -= len(piece)
        if piece:
            yield piece
    src.expect_end(header.message_id)
