"""Known-answer tests: the ESDK's own message format v2 commitment vectors.

Every vector is its own test (ids are the vectors' comments). Unsigned ones
(suite 0x0478) must decrypt to the expected plaintext and derive the
published keys, or fail with CommitmentMismatch where the vector expects a
failure. Signed ones (0x0578) must be refused as an unsupported suite.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest

from fsrecrypt import format as fmt
from fsrecrypt.errors import AuthenticationFailed, CommitmentMismatch, UnsupportedAlgorithmSuite
from fsrecrypt.format.constants import _IV

VECTORS = Path(__file__).parents[1] / "fixtures" / "vectors" / "esdk-v2-commitment-vectors.json"


def _load() -> list[dict[str, Any]]:
    return json.loads(VECTORS.read_text())["tests"]


ALL = _load()
UNSIGNED = [v for v in ALL if base64.b64decode(v["ciphertext"].strip())[1:3] == b"\x04\x78"]
SIGNED = [v for v in ALL if base64.b64decode(v["ciphertext"].strip())[1:3] != b"\x04\x78"]


def _b64(vector: dict[str, Any], name: str) -> bytes:
    return base64.b64decode(vector[name].strip())


def _plaintext(vector: dict[str, Any]) -> bytes:
    return "".join(vector["plaintext-frames"]).encode("utf-8")


def _canonical_ivs(ciphertext: bytes) -> bool:
    """True if every frame carries the IV the spec prescribes (8 zero bytes || seq)."""
    header = fmt.parse_header(ciphertext)
    pos = header.size
    if not header.framed:
        return ciphertext[pos : pos + 12] == _IV.pack(1)
    seq = 1
    while True:
        if ciphertext[pos : pos + 4] == b"\xff\xff\xff\xff":
            iv = ciphertext[pos + 8 : pos + 20]
            return iv == _IV.pack(seq)
        if ciphertext[pos + 4 : pos + 16] != _IV.pack(seq):
            return False
        pos += header.frame_length + 32
        seq += 1


def test_vector_file_is_complete() -> None:
    # Guards the parametrization below: an empty list would pass vacuously.
    assert len(ALL) == 46
    assert len(UNSIGNED) == 23
    assert len(SIGNED) == 23
    assert sum(1 for v in UNSIGNED if not v["status"]) == 3


@pytest.mark.parametrize("vector", UNSIGNED, ids=[v["comment"] for v in UNSIGNED])
def test_unsigned_vector(vector: dict[str, Any]) -> None:
    ciphertext = _b64(vector, "ciphertext")
    data_key = _b64(vector, "decrypted-dek")
    header = fmt.parse_header(ciphertext)

    # The header parses to exactly the published header bytes and values.
    assert header.raw == _b64(vector, "header")
    assert fmt.parse_header(header.raw) == header
    assert header.message_id == _b64(vector, "message-id")
    assert header.encryption_context == vector["encryption-context"]
    assert header.suite_id == fmt.SUITE_ID
    assert fmt.read_header(io.BytesIO(ciphertext)) == header

    content_key, commitment = fmt.derive_keys(data_key, header.message_id)

    if not vector["status"]:
        # The published content key/commitment are those of the key that
        # really encrypted the message; the given data key must not match.
        assert commitment != header.commitment_key
        with pytest.raises(CommitmentMismatch):
            fmt.verify_header(header, data_key)
        with pytest.raises(CommitmentMismatch):
            list(fmt.decrypt_stream(io.BytesIO(ciphertext), lambda h: data_key))
        return

    assert commitment == _b64(vector, "commitment") == header.commitment_key
    if "content-encryption-key" in vector:
        assert content_key == _b64(vector, "content-encryption-key")
    assert fmt.verify_header(header, data_key) == content_key
    seen: list[fmt.Header] = []

    def key_for(h: fmt.Header) -> bytes:
        seen.append(h)
        return data_key

    if _canonical_ivs(ciphertext):
        out = b"".join(fmt.decrypt_stream(io.BytesIO(ciphertext), key_for))
    else:
        # Some published vectors carry IVs other than 0^8 || seq. Official
        # readers accept them; the strict default refuses them, and the
        # lenient mode must still decrypt (and authenticate) them.
        with pytest.raises(AuthenticationFailed, match="IV"):
            list(fmt.decrypt_stream(io.BytesIO(ciphertext), key_for))
        out = b"".join(fmt.decrypt_stream(io.BytesIO(ciphertext), key_for, strict_iv=False))
    assert out == _plaintext(vector)
    assert seen[0] == header

    if header.framed:
        size = len(ciphertext)
        assert fmt.plaintext_size(header, size) == len(out)
        plan = fmt.plan_range(header, size, 0, None)
        if _canonical_ivs(ciphertext):
            got = b"".join(
                fmt.decrypt_range(
                    header,
                    content_key,
                    plan,
                    [ciphertext[plan.ciphertext_start : plan.ciphertext_end]],
                    size,
                )
            )
            assert got == out


@pytest.mark.parametrize("vector", SIGNED, ids=[v["comment"] for v in SIGNED])
def test_signed_vector_is_refused(vector: dict[str, Any]) -> None:
    ciphertext = _b64(vector, "ciphertext")
    with pytest.raises(UnsupportedAlgorithmSuite, match="unsupported algorithm suite 0x0578"):
        fmt.parse_header(ciphertext)
    with pytest.raises(UnsupportedAlgorithmSuite, match="unsupported algorithm suite"):
        fmt.read_header(io.BytesIO(ciphertext))
    called = []
    with pytest.raises(UnsupportedAlgorithmSuite, match="unsupported algorithm suite"):
        list(fmt.decrypt_stream(io.BytesIO(ciphertext), lambda h: called.append(h) or b""))
    assert not called  # the key provider is never asked for an unsupported message


def test_header_roundtrip_with_context_and_many_keys() -> None:
    edks = [fmt.EncryptedDataKey(f"p{i}", bytes([i]) * i, bytes(48)) for i in range(5)]
    ctx = {"tenant": "acme", "recording": "r-1", "é": "ü", "a": ""}
    header = fmt.build_header(bytes(32), edks, ctx, 8192, message_id=bytes(range(32)))
    parsed = fmt.parse_header(header.raw + b"body bytes follow")
    assert parsed == header
    assert parsed.encryption_context == ctx
    assert parsed.size == 92 + len(fmt.serialize_context(ctx)) + sum(
        6 + len(e.provider_id) + len(e.provider_info) + len(e.ciphertext) for e in edks
    )
