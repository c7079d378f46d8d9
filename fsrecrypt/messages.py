"""One AWS Encryption SDK message from one stream, and back, with a key provider alone.

What ``fsrecrypt encrypt`` and ``fsrecrypt decrypt`` do: no object store, no
database, no recording row, so they work on a machine with nothing but a
keyring (or KMS access) and the files. The message is the same format the
pipeline stores (``docs/format.md``): any official ESDK with the key reads
it. Only keys and format are imported here, so a local-keyring encrypt
never loads boto3 or psycopg2 (``tests/test_layout.py`` keeps it that way).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from fsrecrypt import format as esdk
from fsrecrypt.keys.base import KeyProvider


@dataclass(frozen=True)
class EncryptedMessage:
    """What was written: sizes and the message id (never key material)."""

    plaintext_bytes: int
    ciphertext_bytes: int
    message_id: str


def encrypt_message(
    provider: KeyProvider,
    key_id: str,
    context: Mapping[str, str],
    source: BinaryIO,
    out: BinaryIO,
    *,
    frame_length: int,
) -> EncryptedMessage:
    """Encrypt ``source`` into ``out`` under a fresh data key wrapped by ``key_id``.

    ``context`` is bound to the message (authenticated, not secret); frames
    are ``frame_length`` bytes of plaintext. Memory stays bounded by a few
    frames whatever the input size.
    """
    data_key = provider.generate_data_key(key_id, context)
    encryptor = esdk.Encryptor(
        data_key.plaintext, [data_key.encrypted], dict(context), frame_length=frame_length
    )
    for chunk in encryptor.stream(source):
        out.write(chunk)
    return EncryptedMessage(
        plaintext_bytes=encryptor.plaintext_length,
        ciphertext_bytes=encryptor.ciphertext_length,
        message_id=encryptor.header.message_id.hex(),
    )


def decrypt_message(provider: KeyProvider, source: BinaryIO, out: BinaryIO) -> int:
    """Decrypt the message ``source`` into ``out``; returns the plaintext byte count.

    The data key is unwrapped from the header's own EDKs, bound to the
    header's encryption context. Every frame is verified before its
    plaintext is written, but a message that fails part way has already
    written its verified frames: callers that must not leave partial
    plaintext write through ``fsrecrypt.cli.output.atomic_output``.
    """

    def data_key_for(header: esdk.Header) -> bytes:
        return provider.decrypt_data_key(header.encrypted_data_keys, header.encryption_context)

    written = 0
    for chunk in esdk.decrypt_stream(source, data_key_for):
        out.write(chunk)
        written += len(chunk)
    return written
