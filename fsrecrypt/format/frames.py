"""The framed body: streaming encryption and strict streaming decryption.

:class:`Encryptor` seals one frame at a time (memory stays at about two
frames). :func:`decrypt_stream` and its throughput variant
:func:`decrypt_stream_batched` release a frame's plaintext only after that
frame's tag verified, and refuse reordered, dropped, truncated or trailing
frames with typed errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fsrecrypt.errors import (
    AuthenticationFailed,
    FormatError,
    InvalidState,
    MalformedMessage,
    TrailingData,
    TruncatedMessage,
)
from fsrecrypt.format.constants import (
    _FINAL_FIELDS,
    _FINAL_FRAME_LABEL,
    _FINAL_PREFIX,
    _FRAME_LABEL,
    _IV,
    _REGULAR_PREFIX,
    _SEQ_AND_LENGTH,
    _SINGLE_BLOCK_LABEL,
    _U32,
    _U64,
    CONTENT_TYPE_NON_FRAMED,
    DEFAULT_FRAME_LENGTH,
    FINAL_FRAME_MARKER,
    FINAL_FRAME_OVERHEAD,
    IV_LENGTH,
    MAX_NON_FRAMED_LENGTH,
    MAX_SEQUENCE_NUMBER,
    REGULAR_FRAME_OVERHEAD,
    TAG_LENGTH,
)
from fsrecrypt.format.header import EncryptedDataKey, Header, _build, read_header, verify_header
from fsrecrypt.format.source import _fill, _Input, _Readable

# --- encryption ---------------------------------------------------------------------------


class Encryptor:
    """Encrypt one message, streaming: header first, then one frame at a time.

    Memory stays at about two frames whatever the input size (one input
    buffer reused for every frame, plus the frame being handed out), which is
    what lets the daemon encrypt hour-long recordings on a small box.
    """

    def __init__(
        self,
        data_key: bytes,
        encrypted_data_keys: Sequence[EncryptedDataKey],
        encryption_context: Mapping[str, str],
        frame_length: int = DEFAULT_FRAME_LENGTH,
        message_id: bytes | None = None,
    ) -> None:
        self.header, self._content_key = _build(
            data_key, encrypted_data_keys, encryption_context, frame_length, message_id
        )
        self.frame_length = frame_length
        self.plaintext_length = 0
        self.ciphertext_length = 0
        self._started = False

    def __repr__(self) -> str:
        return (
            f"Encryptor(message_id={self.header.message_id.hex()}, "
            f"frame_length={self.frame_length})"
        )

    def stream(self, source: BinaryIO) -> Iterator[bytes]:
        """Yield the header bytes, then each frame as soon as it is sealed.

        Input that is an exact multiple of the frame length ends with an empty
        final frame (as the Python ESDK writes); empty input is a single empty
        final frame. May be called once: a second pass would reuse the
        message's nonces.
        """
        if self._started:
            raise InvalidState(
                f"message {self.header.message_id.hex()} was already encrypted; "
                "create a new Encryptor for each message"
            )
        self._started = True
        return self._frames(source)

    def _frames(self, source: _Readable) -> Iterator[bytes]:
        frame_length = self.frame_length
        aes = AESGCM(self._content_key)
        message_id = self.header.message_id
        regular_aad = message_id + _FRAME_LABEL
        final_aad = message_id + _FINAL_FRAME_LABEL
        seq_and_length = _SEQ_AND_LENGTH.pack
        regular_prefix = _REGULAR_PREFIX.pack
        encrypt = aes.encrypt
        readinto = getattr(source, "readinto", None)
        inbuf = bytearray(frame_length)
        inview = memoryview(inbuf)
        frame_size = frame_length + REGULAR_FRAME_OVERHEAD

        raw = self.header.raw
        self.ciphertext_length += len(raw)
        yield raw

        seq = 1
        while True:
            n = _fill(source, readinto, inview)
            if n < frame_length:
                break
            if seq >= FINAL_FRAME_MARKER - 1:
                raise MalformedMessage("plaintext too long for this frame length")
            # One 64 KiB copy (prefix + sealed) buys an immutable ``bytes`` per
            # frame; encrypt_into a bytearray would save ~5% but hand out
            # mutable objects to callers that may keep them.
            prefix = regular_prefix(seq, seq)
            out = prefix + encrypt(
                prefix[4:], inview, regular_aad + seq_and_length(seq, frame_length)
            )
            self.plaintext_length += frame_length
            self.ciphertext_length += frame_size
            yield out
            seq += 1

        prefix = _FINAL_PREFIX.pack(FINAL_FRAME_MARKER, seq, seq, n)
        out = prefix + encrypt(prefix[8:20], inview[:n], final_aad + seq_and_length(seq, n))
        self.plaintext_length += n
        self.ciphertext_length += len(out)
        yield out


# --- decryption -------------------------------------------------------------------------------


class _FrameReader:
    """Reads and authenticates frames in order; plaintext leaves only after its tag verified."""

    def __init__(
        self, src: _Input, header: Header, content_key: bytes, *, strict_iv: bool = True
    ) -> None:
        self._src = src
        self._strict_iv = strict_iv
        self._aes = AESGCM(content_key)
        self._frame_length = header.frame_length
        self._message_id = header.message_id
        self._regular_aad = header.message_id + _FRAME_LABEL
        self._final_aad = header.message_id + _FINAL_FRAME_LABEL
        self._buf = bytearray(IV_LENGTH + header.frame_length + TAG_LENGTH)
        self._view = memoryview(self._buf)

    def read(self, seq: int) -> tuple[bytes, bool]:
        """Return (plaintext, is_final) of the frame that must carry ``seq``."""
        src = self._src
        what = f"frame {seq}"
        (first,) = _U32.unpack(src.read_exact(4, what))
        if first == FINAL_FRAME_MARKER:
            fseq, iv, length = _FINAL_FIELDS.unpack(src.read_exact(20, what))
            self._check_position(seq, fseq, iv)
            if length > self._frame_length:
                raise MalformedMessage(
                    f"final frame {seq} claims {length} bytes, more than the frame length "
                    f"{self._frame_length}"
                )
            view = self._view[: length + TAG_LENGTH]
            src.readinto_exact(view, what)
            aad = self._final_aad + _SEQ_AND_LENGTH.pack(seq, length)
            return self._open(seq, iv, view, aad), True
        self._check_position(seq, first, None)
        view = self._view
        src.readinto_exact(view, what)
        iv = bytes(view[:IV_LENGTH])
        self._check_position(seq, seq, iv)
        aad = self._regular_aad + _SEQ_AND_LENGTH.pack(seq, self._frame_length)
        return self._open(seq, iv, view[IV_LENGTH:], aad), False

    def _check_position(self, expected: int, got: int, iv: bytes | None) -> None:
        if got != expected:
            raise AuthenticationFailed(
                f"frame {expected} of message {self._message_id.hex()} carries sequence "
                f"number {got} (frames reordered, dropped or duplicated)"
            )
        if iv is not None and self._strict_iv and iv != _IV.pack(expected):
            raise AuthenticationFailed(
                f"frame {expected} of message {self._message_id.hex()} has a wrong IV"
            )

    def _open(self, seq: int, iv: bytes, sealed: memoryview, aad: bytes) -> bytes:
        try:
            return self._aes.decrypt(iv, sealed, aad)
        except InvalidTag:
            raise AuthenticationFailed(
                f"frame {seq} of message {self._message_id.hex()} does not authenticate"
            ) from None


def _decrypt_non_framed(
    src: _Input, header: Header, content_key: bytes, *, strict_iv: bool = True
) -> bytes:
    """Authenticate and return the single-block body (interop only; buffers it whole)."""
    what = "the non-framed body"
    iv = src.read_exact(IV_LENGTH, what)
    (length,) = _U64.unpack(src.read_exact(8, what))
    if strict_iv and iv != _IV.pack(1):
        raise AuthenticationFailed(
            f"non-framed body of message {header.message_id.hex()} has a wrong IV"
        )
    if length > MAX_NON_FRAMED_LENGTH:
        raise MalformedMessage(f"non-framed body claims {length} bytes, over the GCM limit")
    sealed = src.read_large(length + TAG_LENGTH, what)
    aad = header.message_id + _SINGLE_BLOCK_LABEL + _SEQ_AND_LENGTH.pack(1, length)
    try:
        return AESGCM(content_key).decrypt(iv, sealed, aad)
    except InvalidTag:
        raise AuthenticationFailed(
            f"non-framed body of message {header.message_id.hex()} does not authenticate"
        ) from None


def decrypt_stream(
    source: BinaryIO,
    data_key_for: Callable[[Header], bytes],
    *,
    strict_iv: bool = True,
) -> Iterator[bytes]:
    """Strictly decrypt a whole message from a stream, one frame's plaintext at a time.

    ``data_key_for(header)`` unwraps the data key (it sees the EDKs and the
    context). Commitment and header tag are checked before any frame; each
    frame's plaintext is yielded only after its own tag verified, so a
    consumer may have received frames 1..k-1 when frame k fails, never k.
    Truncation, reordering, wrong IVs, an oversized final frame and bytes after
    the final frame all raise typed errors.

    ``strict_iv=False`` accepts any IV a frame carries (the tag still has to
    verify under it, and the sequence number is still checked through the
    AAD). Official ESDK readers do not check IVs, and some published known
    answers use non-canonical ones; fsrecrypt's own reads stay strict.
    """
    src = _Input(source)
    header = read_header(source)
    content_key = verify_header(header, data_key_for(header))
    if header.content_type == CONTENT_TYPE_NON_FRAMED:
        plaintext = _decrypt_non_framed(src, header, content_key, strict_iv=strict_iv)
        src.expect_end(header.message_id)
        if plaintext:
            yield plaintext
        return
    frames = _FrameReader(src, header, content_key, strict_iv=strict_iv)
    seq = 1
    while True:
        plaintext, final = frames.read(seq)
        if final:
            src.expect_end(header.message_id)
            if plaintext:
                yield plaintext
            return
        yield plaintext
        seq += 1


DEFAULT_BATCH_BYTES = 1 << 20
"""Ciphertext per decryption batch: big enough that handing a batch to a
worker thread costs little next to decrypting it, small enough that the
first batch (and a failed one) stays cheap."""

_FrameJob = tuple[int, bytes, memoryview, bytes]  # sequence number, IV, sealed bytes, AAD
# The verified plaintext and the first failure.
_BatchResult = tuple[bytes | bytearray, "AuthenticationFailed | None"]


def _open_batch(aes: AESGCM, message_id: bytes, jobs: Sequence[_FrameJob]) -> _BatchResult:
    """Authenticate and decrypt a batch's frames in order, stopping at the first bad one.

    Runs in whatever thread ``submit`` picks (AESGCM releases the GIL).
    Returns the plaintext of the frames that verified before the first
    failure, and that failure (None when all verified): like
    :func:`decrypt_stream`, frames 1..k-1 may go out when frame k fails,
    never frame k or a later one.

    The frames are decrypted straight into one buffer for the batch (no
    per-frame ``bytes`` to allocate, zero-fill and then join: that was most
    of a worker's time besides AES itself). ``decrypt_into`` may have
    written the failed frame's unauthenticated plaintext before refusing
    its tag, so on a failure that part is wiped and cut off before the
    buffer is returned.
    """
    out = bytearray(sum(len(sealed) - TAG_LENGTH for _seq, _iv, sealed, _aad in jobs))
    into = _decrypter_into(aes)
    failure = None
    pos = 0
    with memoryview(out) as view:
        for seq, iv, sealed, aad in jobs:
            end = pos + len(sealed) - TAG_LENGTH
            try:
                into(iv, sealed, aad, view[pos:end])
            except InvalidTag:
                failure = AuthenticationFailed(
                    f"frame {seq} of message {message_id.hex()} does not authenticate"
                )
                view[pos:] = bytes(len(out) - pos)
                break
            pos = end
    if failure is not None:
        del out[pos:]
    return out, failure


def _decrypter_into(aes: AESGCM) -> Callable[[bytes, memoryview, bytes, memoryview], object]:
    """``aes.decrypt_into`` where cryptography has it; older versions decrypt and copy."""
    into = getattr(aes, "decrypt_into", None)
    if into is not None:
        return into  # type: ignore[no-any-return]

    def copy_into(iv: bytes, sealed: memoryview, aad: bytes, dest: memoryview) -> None:
        dest[:] = aes.decrypt(iv, sealed, aad)

    return copy_into


def decrypt_stream_batched(
    source: BinaryIO,
    data_key_for: Callable[[Header], bytes],
    submit: Callable[[Callable[[], _BatchResult]], Callable[[], _BatchResult]],
    *,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    depth: int = 2,
) -> Iterator[bytes]:
    """:func:`decrypt_stream` with decryption handed out in batches, for throughput.

    ``submit(job)`` starts ``job`` (somewhere: a thread pool, or inline) and
    returns a callable that waits for and returns its result (a job reports
    a bad tag in its result rather than raising). Frames are read and
    checked (sequence numbers, IVs, lengths, the end of the message) here,
    in the caller's thread, about ``batch_bytes`` of ciphertext at a time;
    up to ``depth`` batches are decrypted while the caller goes on reading
    and while the consumer handles earlier plaintext.

    The guarantees of :func:`decrypt_stream` hold: plaintext is yielded only
    after the tags of all the frames it comes from verified, in order, the
    final frame's only after the end of the message was proven (no trailing
    bytes). When frame k fails (bad tag, wrong sequence number or IV,
    truncation), the consumer receives exactly frames 1..k-1, then the error;
    never frame k or a later one. Chunks are up to one batch of plaintext long;
    each is a fresh ``bytearray`` (decrypted in place, see :func:`_open_batch`)
    that the consumer may keep.
    """
    if batch_bytes <= 0 or depth <= 0:
        raise InvalidState("batch_bytes and depth must be positive")
    src = _Input(source)
    header = read_header(source)
    content_key = verify_header(header, data_key_for(header))
    if header.content_type == CONTENT_TYPE_NON_FRAMED:
        plaintext = _decrypt_non_framed(src, header, content_key)
        src.expect_end(header.message_id)
        if plaintext:
            yield plaintext
        return
    frame_length = header.frame_length
    stride = frame_length + REGULAR_FRAME_OVERHEAD
    per_batch = max(1, batch_bytes // stride)
    block = per_batch * stride
    # A final frame starting at the last regular slot may reach 8 bytes further.
    capacity = block + FINAL_FRAME_OVERHEAD - REGULAR_FRAME_OVERHEAD
    aes = AESGCM(content_key)
    message_id = header.message_id
    regular_aad = message_id + _FRAME_LABEL
    final_aad = message_id + _FINAL_FRAME_LABEL
    readinto = getattr(source, "readinto", None)
    # Each batch in flight owns its buffer (a worker reads it); once its result
    # is collected the buffer is reused, so a stream allocates and zero-fills
    # depth + 1 buffers rather than one per batch.
    pending: list[tuple[Callable[[], _BatchResult], bytearray]] = []
    spare: list[bytearray] = []
    failure: FormatError | None = None  # found while reading: raised after earlier frames
    seq = 1
    finished = False
    while not finished or pending:
        while not finished and len(pending) < depth:
            # Never a buffer still in flight: a worker may be reading it.
            buf = spare.pop() if spare else bytearray(capacity)
            view = memoryview(buf)
            filled = _fill(source, readinto, view[:block])

            def need(end: int, seq: int, view: memoryview = view) -> None:
                nonlocal filled
                if filled < end:
                    filled += _fill(source, readinto, view[filled:end])
                    if filled < end:
                        raise TruncatedMessage(f"message ends inside frame {seq}")

            jobs: list[_FrameJob] = []
            pos = 0
            try:
                while True:
                    if pos == filled:
                        if filled < block:  # end of input before the final frame
                            raise TruncatedMessage(f"message ends inside frame {seq}")
                        break
                    need(pos + 4, seq)
                    (first,) = _U32.unpack_from(buf, pos)
                    if first == FINAL_FRAME_MARKER:
                        need(pos + 24, seq)
                        fseq, iv, length = _FINAL_FIELDS.unpack_from(buf, pos + 4)
                        _check_frame_position(message_id, seq, fseq, iv)
                        if length > frame_length:
                            raise MalformedMessage(
                                f"final frame {seq} claims {length} bytes, more than the frame "
                                f"length {frame_length}"
                            )
                        end = pos + 24 + length + TAG_LENGTH
                        need(end, seq)
                        if filled > end:
                            raise TrailingData(
                                f"bytes follow the final frame of message {message_id.hex()}"
                            )
                        src.expect_end(message_id)
                        final_aad_seq = final_aad + _SEQ_AND_LENGTH.pack(seq, length)
                        jobs.append((seq, iv, view[pos + 24 : end], final_aad_seq))
                        finished = True
                        break
                    _check_frame_position(message_id, seq, first, None)
                    need(pos + stride, seq)
                    iv = bytes(view[pos + 4 : pos + 4 + IV_LENGTH])
                    _check_frame_position(message_id, seq, seq, iv)
                    if seq >= MAX_SEQUENCE_NUMBER:
                        raise MalformedMessage(
                            f"message {message_id.hex()} has more frames than sequence numbers"
                        )
                    jobs.append(
                        (
                            seq,
                            iv,
                            view[pos + 4 + IV_LENGTH : pos + stride],
                            regular_aad + _SEQ_AND_LENGTH.pack(seq, frame_length),
                        )
                    )
                    seq += 1
                    pos += stride
            except FormatError as exc:
                # The frames before the bad spot still go out (once verified), as
                # decrypt_stream would have released them; nothing after it.
                failure = exc
                finished = True
            if jobs:
                batch = tuple(jobs)
                wait = submit(lambda batch=batch: _open_batch(aes, message_id, batch))
                pending.append((wait, buf))
            else:
                spare.append(buf)
        if pending:
            wait, done = pending.pop(0)
            plaintext, bad = wait()
            spare.append(done)  # its job returned: nothing reads it any more
            if plaintext:
                yield plaintext
            if bad is not None:
                raise bad
    if failure is not None:
        raise failure


def _check_frame_position(message_id: bytes, expected: int, got: int, iv: bytes | None) -> None:
    """The strict checks of :class:`_FrameReader`: right sequence number, canonical IV."""
    if got != expected:
        raise AuthenticationFailed(
            f"frame {expected} of message {message_id.hex()} carries sequence "
            f"number {got} (frames reordered, dropped or duplicated)"
        )
    if iv is not None and iv != _IV.pack(expected):
        raise AuthenticationFailed(f"frame {expected} of message {message_id.hex()} has a wrong IV")
