"""The message header: its model, parsing, building, key derivation and commitment.

A header names the suite, the message id, the encryption context and the
wrapped data keys, and ends with a key commitment and an authentication
tag. Nothing in it is trusted before :func:`verify_header` checked the
commitment (constant time) and then the tag with the data key; rewrapping
(key rotation) replaces only the wrapped keys and re-authenticates.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fsrecrypt.errors import (
    AuthenticationFailed,
    CommitmentMismatch,
    MalformedMessage,
    TruncatedMessage,
    UnsupportedAlgorithmSuite,
)
from fsrecrypt.format.constants import (
    _COMMIT_KEY_INFO,
    _CONTENT_KEY_INFO,
    _CONTEXT_OFFSET,
    _HEADER_FIXED_PREFIX,
    _HEADER_FIXED_TAIL,
    _PUBLIC_KEY_CONTEXT_KEY,
    _RESERVED_PREFIX,
    _U16,
    _U32,
    _ZERO_IV,
    COMMITMENT_LENGTH,
    CONTENT_TYPE_FRAMED,
    CONTENT_TYPE_NON_FRAMED,
    DEFAULT_FRAME_LENGTH,
    FRAME_LENGTH_MULTIPLE,
    KEY_LENGTH,
    MAX_BYTE_ARRAY,
    MAX_FRAME_LENGTH,
    MESSAGE_ID_LENGTH,
    MESSAGE_VERSION,
    SUITE_ID,
    TAG_LENGTH,
)
from fsrecrypt.format.source import _Input

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
        message_id = secrets.token_bytes(MESSAGE_ID_LENGTH)
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
