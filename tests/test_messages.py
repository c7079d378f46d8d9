"""One message from one stream and back, with a key provider alone (``fsrecrypt encrypt``)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from fsrecrypt import format as esdk
from fsrecrypt.errors import FsrecryptError, KeyAccessError
from fsrecrypt.keys import LocalKeyring
from fsrecrypt.messages import decrypt_message, encrypt_message

CONTEXT = {"tenant_id": "t1", "recording_id": "r1"}


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    ring = LocalKeyring(str(tmp_path / "keyring.json"))
    ring.create_key("k1")
    return ring


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 4096 + 17])
def test_round_trip(keyring: LocalKeyring, size: int) -> None:
    plaintext = os.urandom(size)
    out = io.BytesIO()
    message = encrypt_message(keyring, "k1", CONTEXT, io.BytesIO(plaintext), out, frame_length=4096)
    blob = out.getvalue()
    assert message.plaintext_bytes == size
    assert message.ciphertext_bytes == len(blob)
    header = esdk.parse_header(blob)
    assert header.message_id.hex() == message.message_id
    assert dict(header.encryption_context) == CONTEXT
    assert header.frame_length == 4096
    back = io.BytesIO()
    assert decrypt_message(keyring, io.BytesIO(blob), back) == size
    assert back.getvalue() == plaintext


def test_message_of_another_keyring_is_refused_and_nothing_written(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    out = io.BytesIO()
    encrypt_message(keyring, "k1", CONTEXT, io.BytesIO(b"x" * 5000), out, frame_length=4096)
    stranger = LocalKeyring(str(tmp_path / "other.json"))
    stranger.create_key("k1")  # same id, different key material
    back = io.BytesIO()
    with pytest.raises(KeyAccessError):
        decrypt_message(stranger, io.BytesIO(out.getvalue()), back)
    assert back.getvalue() == b""


def test_tampered_context_is_refused_and_nothing_written(keyring: LocalKeyring) -> None:
    out = io.BytesIO()
    encrypt_message(keyring, "k1", CONTEXT, io.BytesIO(b"y" * 5000), out, frame_length=4096)
    blob = bytearray(out.getvalue())
    at = blob.index(b"recording_id") + len(b"recording_id") + 2  # the value's first byte
    assert blob[at : at + 2] == b"r1"
    blob[at + 1 : at + 2] = b"2"
    back = io.BytesIO()
    with pytest.raises(FsrecryptError):
        decrypt_message(keyring, io.BytesIO(bytes(blob)), back)
    assert back.getvalue() == b""


def test_unknown_key_id_is_a_typed_error(keyring: LocalKeyring) -> None:
    out = io.BytesIO()
    with pytest.raises(KeyAccessError):
        encrypt_message(keyring, "nope", CONTEXT, io.BytesIO(b"z"), out, frame_length=4096)
    assert out.getvalue() == b""
