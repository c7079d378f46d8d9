"""AWS Encryption SDK message format v2, algorithm suite 0x0478, framed.

Every recording is stored as one ESDK message so that any official ESDK with
the key can decrypt it without fsrecrypt (see ``../shared/docs/esdk-format.md``
for the byte layout). This module is the only place that knows that layout:

* header build / parse / verify (key commitment first, then the header tag),
* a streaming :class:`Encryptor` whose memory stays at about two frames,
* a strict streaming decryptor (:func:`decrypt_stream`) that never releases
  a frame's plaintext before the frame's tag verified,
* random access (:func:`plan_range` / :func:`decrypt_range`): a plaintext
  byte range maps to one contiguous run of frames, fetchable with a single
  ranged GET.

It does no I/O of its own: it reads only from the file-like objects and byte
iterables handed to it, so the same code serves local files, S3 bodies and
tests. Only the typed errors of :mod:`fsrecrypt.errors` escape, and their
messages name identifiers (message ids, sequence numbers, lengths), never key
material or plaintext.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fsrecrypt.errors import (
    AuthenticationFailed,
    CommitmentMismatch,
    FormatError,
    InputFileError,
    InvalidState,
    MalformedMessage,
    RangeNotSatisfiable,
    TrailingData,
    TruncatedMessage,
    UnsupportedAlgorithmSuite,
)

__all__ = [
    "DEFAULT_FRAME_LENGTH",
    "SUITE_ID",
    "EncryptedDataKey",
    "Encryptor",
    "Header",
    "RangePlan",
    "build_header",
    "ciphertext_size",
    "decrypt_range",
    "decrypt_stream",
    "decrypt_stream_batched",
    "derive_keys",
    "parse_header",
    "plaintext_size",
    "plan_range",
    "read_header",
    "rewrap_header",
    "serialize_context",
    "verify_header",
]

# --- constants -------------------------------------------------------------------

SUITE_ID = 0x0478
"""AES-256-GCM, HKDF-SHA512, key commitment, no signature: the only suite we read."""

MESSAGE_VERSION = 0x02
DEFAULT_FRAME_LENGTH = 65536
FRAME_LENGTH_MULTIPLE = 4096
"""Writers keep frames page-aligned (the Python ESDK only needs multiples of 128)."""
MAX_FRAME_LENGTH = 2**31 - 1
"""The specification's bound on frame length; also bounds a reader's frame buffer."""
MAX_SEQUENCE_NUMBER = 2**32 - 1
MAX_NON_FRAMED_LENGTH = 2**36 - 32
"""AES-GCM's limit for one invocation (the non-framed body is one GCM message)."""
MAX_BYTE_ARRAY = 2**16 - 1

CONTENT_TYPE_NON_FRAMED = 0x01
CONTENT_TYPE_FRAMED = 0x02

MESSAGE_ID_LENGTH = 32
KEY_LENGTH = 32
IV_LENGTH = 12
TAG_LENGTH = 16
COMMITMENT_LENGTH = 32
FINAL_FRAME_MARKER = 0xFFFFFFFF
REGULAR_FRAME_OVERHEAD = 4 + IV_LENGTH + TAG_LENGTH  # 32
FINAL_FRAME_OVERHEAD = 4 + 4 + IV_LENGTH + 4 + TAG_LENGTH  # 40
NON_FRAMED_OVERHEAD = IV_LENGTH + 8 + TAG_LENGTH  # 36

_RESERVED_PREFIX = "aws-crypto-"
_PUBLIC_KEY_CONTEXT_KEY = "aws-crypto-public-key"
_CONTENT_KEY_INFO = struct.pack(">H", SUITE_ID) + b"DERIVEKEY"
_COMMIT_KEY_INFO = b"COMMITKEY"
_ZERO_IV = bytes(IV_LENGTH)

_FRAME_LABEL = b"AWSKMSEncryptionClient Frame"
_FINAL_FRAME_LABEL = b"AWSKMSEncryptionClient Final Frame"
_SINGLE_BLOCK_LABEL = b"AWSKMSEncryptionClient Single Block"

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SEQ_AND_LENGTH = struct.Struct(">IQ")  # tail of every body AAD
_IV = struct.Struct(">8xI")  # 8 zero bytes || u32 sequence number
_REGULAR_PREFIX = struct.Struct(">I8xI")  # sequence number, IV
_FINAL_PREFIX = struct.Struct(">II8xII")  # marker, sequence number, IV, content length
_FINAL_FIELDS = struct.Struct(">I12sI")  # after the marker: sequence number, IV, length
_HEADER_FIXED_PREFIX = 1 + 2 + MESSAGE_ID_LENGTH + 2  # version .. context length
_HEADER_FIXED_TAIL = 1 + 4 + COMMITMENT_LENGTH + TAG_LENGTH  # content type .. auth tag
_CONTEXT_OFFSET = _HEADER_FIXED_PREFIX

_NON_FRAMED_READ_CHUNK = 1 << 20


# --- data types ---------------------------------------------------------------


@dataclass(frozen=True)
class EncryptedDataKey:
    """One wrapped copy of the message's data key, as stored in the header.

    ``provider_id`` names the key provider (``aws-kms`` or a raw keyring's
    namespace); ``provider_info`` tells that provider which key wrapped it.
    """

    provider_id: str
    provider_info: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class Header:
    """A parsed (or freshly built) message header.

    ``raw`` keeps the exact bytes: the header tag authenticates bytes, not
    values, so verification and rewrapping never re-serialize what they read.
    """

    message_id: bytes
    encryption_context: dict[str, str]
    encrypted_data_keys: tuple[EncryptedDataKey, ...]
    content_type: int
    frame_length: int
    commitment_key: bytes
    auth_tag: bytes
    raw: bytes
    suite_id: int = SUITE_ID

    @property
    def size(self) -> int:
        """Header length in bytes; the body starts at this object offset."""
        return len(self.raw)

    @property
    def framed(self) -> bool:
        """True for the framed body (the only one fsrecrypt writes)."""
        return self.content_type == CONTENT_TYPE_FRAMED

    @property
    def authenticated_bytes(self) -> bytes:
        """The header tag's AAD: every byte from the version through the commitment key."""
        return self.raw[:-TAG_LENGTH]

    @property
    def serialized_context(self) -> bytes:
        """The context exactly as stored (without its u16 length)."""
        (length,) = _U16.unpack_from(self.raw, _CONTEXT_OFFSET - 2)
        return self.raw[_CONTEXT_OFFSET : _CONTEXT_OFFSET + length]


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


# --- encryption context ------------------------------------------------------------


def serialize_context(ctx: Mapping[str, str]) -> bytes:
    """Serialize an encryption context the way every ESDK does.

    Returns the bytes without the header's outer u16 length (``b""`` when
    empty): this exact string is also the AAD under which the raw-AES keyring
    wraps the data key, so header and keyring must agree byte for byte.
    Pairs are sorted by the key's UTF-8 bytes. Reserved ``aws-crypto-`` keys
    are refused because ESDKs give them meaning (signature public key).
    """
    if not ctx:
        return b""
    if len(ctx) > MAX_BYTE_ARRAY:
        raise MalformedMessage(f"encryption context has {len(ctx)} pairs (at most 65535)")
    pairs: list[tuple[bytes, bytes]] = []
    for key, value in ctx.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MalformedMessage("encryption context keys and values must be strings")
        if key.startswith(_RESERVED_PREFIX):
            raise MalformedMessage(
                f"encryption context key {key!r} uses the reserved prefix 'aws-crypto-'"
            )
        try:
            kb, vb = key.encode("utf-8"), value.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedMessage(
                f"encryption context key {key!r} or its value is not valid UTF-8"
            ) from None
        if len(kb) > MAX_BYTE_ARRAY or len(vb) > MAX_BYTE_ARRAY:
            raise MalformedMessage(f"encryption context entry {key[:64]!r} is too long")
        pairs.append((kb, vb))
    pairs.sort(key=lambda p: p[0])
    parts = [_U16.pack(len(pairs))]
    for kb, vb in pairs:
        parts += (_U16.pack(len(kb)), kb, _U16.pack(len(vb)), vb)
    out = b"".join(parts)
    if len(out) > MAX_BYTE_ARRAY:
        raise MalformedMessage(f"serialized encryption context is {len(out)} bytes (at most 65535)")
    return out


def _parse_context(data: bytes) -> dict[str, str]:
    """Inverse of :func:`serialize_context`, strict about duplicates and leftovers.

    Order is not enforced (the header tag covers the bytes as written, and the
    reference reader accepts any order); duplicates would make the meaning of
    the context ambiguous, so they are refused.
    """
    if not data:
        return {}
    end = len(data)
    if end < 2:
        raise MalformedMessage("encryption context is shorter than its pair count")
    (count,) = _U16.unpack_from(data, 0)
    pos = 2
    ctx: dict[str, str] = {}
    for _ in range(count):
        strings = []
        for _part in (0, 1):
            if pos + 2 > end:
                raise MalformedMessage("encryption context ends inside a pair")
            (n,) = _U16.unpack_from(data, pos)
            pos += 2
            if pos + n > end:
                raise MalformedMessage("encryption context ends inside a pair")
            try:
                strings.append(data[pos : pos + n].decode("utf-8"))
            except UnicodeDecodeError:
                raise MalformedMessage("encryption context is not valid UTF-8") from None
            pos += n
        key, value = strings
        if key in ctx:
            raise MalformedMessage(f"encryption context repeats the key {key!r}")
        ctx[key] = value
    if pos != end:
        raise MalformedMessage("encryption context has bytes after its last pair")
    return ctx


# --- header parsing ----------------------------------------------------------------


def _unsupported(suite: int, detail: str = "") -> UnsupportedAlgorithmSuite:
    return UnsupportedAlgorithmSuite(
        f"unsupported algorithm suite 0x{suite:04x}{detail} (fsrecrypt reads only 0x{SUITE_ID:04x})"
    )


def _check_version_and_suite(prefix: bytes) -> None:
    """Fail fast on anything but v2/0x0478, before reading or trusting more."""
    if not prefix:
        raise TruncatedMessage("message is empty: no header")
    version = prefix[0]
    if version == 0x01:
        # v1: version, type (0x80), suite id. Every v1 suite lacks key commitment.
        if len(prefix) < 4:
            raise TruncatedMessage("message ends inside the header")
        raise _unsupported(int.from_bytes(prefix[2:4], "big"), " (message format version 1)")
    if version != MESSAGE_VERSION:
        raise MalformedMessage(f"unknown message format version 0x{version:02x}")
    if len(prefix) < 3:
        raise TruncatedMessage("message ends inside the header")
    suite = int.from_bytes(prefix[1:3], "big")
    if suite != SUITE_ID:
        raise _unsupported(suite)


def parse_header(data: bytes) -> Header:
    """Parse the header at the start of ``data`` (which may continue with the body).

    Structure only: nothing here is authenticated until :func:`verify_header`
    ran with the data key.
    """
    buf = bytes(data[:4]) if len(data) >= 4 else bytes(data)
    _check_version_and_suite(buf)
    end = len(data)
    if end < _HEADER_FIXED_PREFIX:
        raise TruncatedMessage("message ends inside the header")
    message_id = bytes(data[3 : 3 + MESSAGE_ID_LENGTH])
    (ctx_len,) = _U16.unpack_from(data, 3 + MESSAGE_ID_LENGTH)
    pos = _HEADER_FIXED_PREFIX
    if pos + ctx_len + 2 > end:
        raise TruncatedMessage("message ends inside the header's encryption context")
    ctx = _parse_context(bytes(data[pos : pos + ctx_len]))
    if _PUBLIC_KEY_CONTEXT_KEY in ctx:
        raise MalformedMessage(
            "encryption context holds a signature public key but suite 0x0478 is unsigned"
        )
    pos += ctx_len
    (edk_count,) = _U16.unpack_from(data, pos)
    pos += 2
    if edk_count == 0:
        raise MalformedMessage("header has no encrypted data keys")
    edks = []
    for index in range(edk_count):
        fields: list[bytes] = []
        for _ in range(3):
            if pos + 2 > end:
                raise TruncatedMessage(f"message ends inside encrypted data key {index}")
            (n,) = _U16.unpack_from(data, pos)
            pos += 2
            if pos + n > end:
                raise TruncatedMessage(f"message ends inside encrypted data key {index}")
            fields.append(bytes(data[pos : pos + n]))
            pos += n
        try:
            provider_id = fields[0].decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessage(
                f"encrypted data key {index} has a provider id that is not UTF-8"
            ) from None
        edks.append(EncryptedDataKey(provider_id, fields[1], fields[2]))
    if pos + _HEADER_FIXED_TAIL > end:
        raise TruncatedMessage("message ends inside the header")
    content_type = data[pos]
    (frame_length,) = _U32.unpack_from(data, pos + 1)
    pos += 5
    if content_type == CONTENT_TYPE_FRAMED:
        if not 1 <= frame_length <= MAX_FRAME_LENGTH:
            raise MalformedMessage(f"frame length {frame_length} is out of range")
    elif content_type == CONTENT_TYPE_NON_FRAMED:
        if frame_length != 0:
            raise MalformedMessage(f"non-framed message declares frame length {frame_length}")
    else:
        raise MalformedMessage(f"unknown content type 0x{content_type:02x}")
    commitment = bytes(data[pos : pos + COMMITMENT_LENGTH])
    pos += COMMITMENT_LENGTH
    auth_tag = bytes(data[pos : pos + TAG_LENGTH])
    pos += TAG_LENGTH
    return Header(
        message_id=message_id,
        encryption_context=ctx,
        encrypted_data_keys=tuple(edks),
        content_type=content_type,
        frame_length=frame_length,
        commitment_key=commitment,
        auth_tag=auth_tag,
        raw=bytes(data[:pos]),
        suite_id=SUITE_ID,
    )


def read_header(source: BinaryIO) -> Header:
    """Read exactly the header's bytes from a stream (never past it).

    Reading field by field lets the body be consumed by whoever comes next
    (decrypt_stream, a copy to the store) without an over-read buffer.
    """
    src = _Input(source)
    parts = [src.read_exact(3, "the header")]
    if parts[0][0] == 0x01:
        parts.append(src.read_exact(1, "the header"))
    _check_version_and_suite(b"".join(parts))
    rest = src.read_exact(MESSAGE_ID_LENGTH + 2, "the header")
    parts.append(rest)
    (ctx_len,) = _U16.unpack_from(rest, MESSAGE_ID_LENGTH)
    ctx_and_count = src.read_exact(ctx_len + 2, "the header")
    parts.append(ctx_and_count)
    (edk_count,) = _U16.unpack_from(ctx_and_count, ctx_len)
    for _ in range(edk_count):
        for _field in range(3):
            n_bytes = src.read_exact(2, "the header")
            parts.append(n_bytes)
            parts.append(src.read_exact(_U16.unpack(n_bytes)[0], "the header"))
    parts.append(src.read_exact(_HEADER_FIXED_TAIL, "the header"))
    return parse_header(b"".join(parts))


# --- keys and header authentication ---------------------------------------------------


def derive_keys(data_key: bytes, message_id: bytes) -> tuple[bytes, bytes]:
    """Return ``(content_key, commitment_key)`` for one message.

    Both come from the data key with the message id as salt, so a data key is
    never used directly and the commitment binds the key to this message.
    """
    if len(data_key) != KEY_LENGTH:
        # A wrong-length key cannot be the key this message commits to.
        raise CommitmentMismatch(f"data key is {len(data_key)} bytes, expected {KEY_LENGTH}")
    if len(message_id) != MESSAGE_ID_LENGTH:
        raise MalformedMessage(f"message id is {len(message_id)} bytes, expected 32")
    content_key = HKDF(
        algorithm=hashes.SHA512(), length=KEY_LENGTH, salt=message_id, info=_CONTENT_KEY_INFO
    ).derive(data_key)
    commitment = HKDF(
        algorithm=hashes.SHA512(), length=COMMITMENT_LENGTH, salt=message_id, info=_COMMIT_KEY_INFO
    ).derive(data_key)
    return content_key, commitment


def verify_header(header: Header, data_key: bytes) -> bytes:
    """Check commitment (constant time), then the header tag; return the content key.

    The commitment comes first because it is what stops a message that
    decrypts to different plaintexts under different keys; only then is the
    header (context, EDKs, frame length) trusted.
    """
    content_key, commitment = derive_keys(data_key, header.message_id)
    if not hmac.compare_digest(commitment, header.commitment_key):
        raise CommitmentMismatch(f"data key does not commit to message {header.message_id.hex()}")
    try:
        AESGCM(content_key).decrypt(_ZERO_IV, header.auth_tag, header.authenticated_bytes)
    except InvalidTag:
        raise AuthenticationFailed(
            f"header authentication tag of message {header.message_id.hex()} does not verify"
        ) from None
    return content_key


def _serialize_edks(edks: Sequence[EncryptedDataKey]) -> bytes:
    if not edks:
        raise MalformedMessage("a message needs at least one encrypted data key")
    if len(edks) > MAX_BYTE_ARRAY:
        raise MalformedMessage(f"{len(edks)} encrypted data keys (at most 65535)")
    parts = [_U16.pack(len(edks))]
    for edk in edks:
        pid = edk.provider_id.encode("utf-8")
        for name, value in (
            ("provider id", pid),
            ("provider info", edk.provider_info),
            ("ciphertext", edk.ciphertext),
        ):
            if len(value) > MAX_BYTE_ARRAY:
                raise MalformedMessage(
                    f"encrypted data key {edk.provider_id!r}: {name} is too long"
                )
            parts += (_U16.pack(len(value)), bytes(value))
    return b"".join(parts)


def _assemble_header(
    content_key: bytes,
    commitment: bytes,
    message_id: bytes,
    serialized_ctx: bytes,
    edks: Sequence[EncryptedDataKey],
    content_type: int,
    frame_length: int,
) -> Header:
    """Lay out the header bytes and compute the tag (shared by build and rewrap)."""
    body = b"".join(
        (
            bytes((MESSAGE_VERSION,)),
            _U16.pack(SUITE_ID),
            message_id,
            _U16.pack(len(serialized_ctx)),
            serialized_ctx,
            _serialize_edks(edks),
            bytes((content_type,)),
            _U32.pack(frame_length),
            commitment,
        )
    )
    tag = AESGCM(content_key).encrypt(_ZERO_IV, b"", body)
    return Header(
        message_id=message_id,
        encryption_context=_parse_context(serialized_ctx),
        encrypted_data_keys=tuple(edks),
        content_type=content_type,
        frame_length=frame_length,
        commitment_key=commitment,
        auth_tag=tag,
        raw=body + tag,
        suite_id=SUITE_ID,
    )


def _check_writer_frame_length(frame_length: int) -> None:
    if (
        isinstance(frame_length, bool)
        or not isinstance(frame_length, int)
        or frame_length <= 0
        or frame_length % FRAME_LENGTH_MULTIPLE
        or frame_length > MAX_FRAME_LENGTH
    ):
        raise MalformedMessage(
            f"frame length {frame_length!r} is not a positive multiple of "
            f"{FRAME_LENGTH_MULTIPLE} below 2**31"
        )


def _build(
    data_key: bytes,
    encrypted_data_keys: Sequence[EncryptedDataKey],
    encryption_context: Mapping[str, str],
    frame_length: int,
    message_id: bytes | None,
) -> tuple[Header, bytes]:
    _check_writer_frame_length(frame_length)
    if message_id is None:
        message_id = os.urandom(MESSAGE_ID_LENGTH)
    content_key, commitment = derive_keys(data_key, message_id)
    header = _assemble_header(
        content_key,
        commitment,
        bytes(message_id),
        serialize_context(encryption_context),
        list(encrypted_data_keys),
        CONTENT_TYPE_FRAMED,
        frame_length,
    )
    return header, content_key


def build_header(
    data_key: bytes,
    encrypted_data_keys: Sequence[EncryptedDataKey],
    encryption_context: Mapping[str, str],
    frame_length: int = DEFAULT_FRAME_LENGTH,
    message_id: bytes | None = None,
) -> Header:
    """Build an authenticated framed header (fresh random message id unless given).

    ``message_id`` exists for tests and known answers: reusing one with the
    same data key would reuse GCM nonces.
    """
    return _build(data_key, encrypted_data_keys, encryption_context, frame_length, message_id)[0]


def rewrap_header(
    header: Header, data_key: bytes, encrypted_data_keys: Sequence[EncryptedDataKey]
) -> Header:
    """Replace the EDKs of a message's header and re-authenticate it.

    The data key, message id, context bytes and frame length stay, so every
    frame (whose AAD names only the message id) stays valid: key rotation
    rewrites a header, not the recording. The data key is verified against
    the old header first so a wrong key can never produce a header that
    commits to something else.
    """
    content_key = verify_header(header, data_key)
    return _assemble_header(
        content_key,
        header.commitment_key,
        header.message_id,
        header.serialized_context,
        list(encrypted_data_keys),
        header.content_type,
        header.frame_length,
    )


# --- reading helpers --------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _ChunkSource:
    """File-like view (readinto/read) of an iterable of byte chunks.

    Lets random-access decryption reuse the streaming frame reader whatever
    chunking the store's ranged GET produced.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._cur = memoryview(b"")
        self._pos = 0

    def _advance(self) -> bool:
        while self._pos >= len(self._cur):
            nxt = next(self._chunks, None)
            if nxt is None:
                return False
            self._cur = memoryview(nxt).cast("B")
            self._pos = 0
        return True

    def readinto(self, buf: memoryview | bytearray) -> int:
        if not self._advance():
            return 0
        n = min(len(buf), len(self._cur) - self._pos)
        buf[:n] = self._cur[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        if not self._advance():
            return b""
        if n < 0:
            n = len(self._cur) - self._pos
        n = min(n, len(self._cur) - self._pos)
        out = bytes(self._cur[self._pos : self._pos + n])
        self._pos += n
        return out


class _Input:
    """Exact reads over a blocking byte stream (``readinto`` when it has one).

    Short reads are normal for sockets and HTTP bodies, so every read loops;
    end of input before the requested count is a truncated message.
    """

    def __init__(self, source: _Readable) -> None:
        self._source = source
        self._readinto = getattr(source, "readinto", None)

    def read_exact(self, n: int, what: str) -> bytes:
        if n == 0:
            return b""
        data = self._source.read(n)
        if data is None:
            raise InputFileError("source returned no data (non-blocking streams are not supported)")
        if len(data) == n:
            return bytes(data)
        parts = [data]
        got = len(data)
        while got < n:
            more = self._source.read(n - got)
            if more is None:
                raise InputFileError(
                    "source returned no data (non-blocking streams are not supported)"
                )
            if not more:
                raise TruncatedMessage(f"message ends inside {what}")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def readinto_exact(self, view: memoryview, what: str) -> None:
        if self._readinto is None:
            view[:] = self.read_exact(len(view), what)
            return
        got = 0
        total = len(view)
        while got < total:
            n = self._readinto(view[got:])
            if n is None:
                raise InputFileError(
                    "source returned no data (non-blocking streams are not supported)"
                )
            if n == 0:
                raise TruncatedMessage(f"message ends inside {what}")
            got += n

    def read_large(self, n: int, what: str) -> bytes:
        """Read ``n`` bytes in bounded steps so a lying length cannot force a huge allocation."""
        parts = []
        left = n
        while left:
            step = min(left, _NON_FRAMED_READ_CHUNK)
            parts.append(self.read_exact(step, what))
            left -= step
        return b"".join(parts)

    def expect_end(self, message_id: bytes) -> None:
        extra = self._source.read(1)
        if extra:
            raise TrailingData(f"bytes follow the final frame of message {message_id.hex()}")


def _fill(source: _Readable, readinto: Callable | None, view: memoryview) -> int:
    """Fill ``view`` from a blocking stream; return the count (short only at end of input)."""
    got = 0
    total = len(view)
    if readinto is not None:
        while got < total:
            n = readinto(view[got:])
            if n is None:
                raise InputFileError(
                    "source returned no data (non-blocking streams are not supported)"
                )
            if n == 0:
                break
            got += n
        return got
    while got < total:
        data = source.read(total - got)
        if data is None:
            raise InputFileError("source returned no data (non-blocking streams are not supported)")
        if not data:
            break
        view[got : got + len(data)] = data
        got += len(data)
    return got


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
