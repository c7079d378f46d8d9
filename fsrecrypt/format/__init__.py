"""AWS Encryption SDK message format v2, algorithm suite 0x0478, framed.

Every recording is stored as one ESDK message so that any official ESDK with
the key can decrypt it without fsrecrypt (``docs/format.md`` describes the
bytes field by field). This package is the only place that knows that
layout, split along the message's own parts:

* :mod:`~fsrecrypt.format.header`: header build / parse / verify (key
  commitment first, then the header tag), context serialization, rewrapping;
* :mod:`~fsrecrypt.format.frames`: a streaming :class:`Encryptor` whose
  memory stays at about two frames, and strict streaming decryptors
  (:func:`decrypt_stream`, :func:`decrypt_stream_batched`) that never release
  a frame's plaintext before the frame's tag verified;
* :mod:`~fsrecrypt.format.ranges`: random access (:func:`plan_range` /
  :func:`decrypt_range`): a plaintext byte range maps to one contiguous run
  of frames, fetchable with a single ranged GET;
* :mod:`~fsrecrypt.format.constants` and :mod:`~fsrecrypt.format.source`:
  the shared wire constants and exact reads over the sources handed in.

It does no I/O of its own: it reads only from the file-like objects and byte
iterables handed to it, so the same code serves local files, S3 bodies and
tests. It imports nothing of fsrecrypt but :mod:`fsrecrypt.errors` (checked by
``tests/test_layout.py``). Only those typed errors escape, and their messages
name identifiers (message ids, sequence numbers, lengths), never key material
or plaintext.
"""

from __future__ import annotations

from fsrecrypt.format.constants import (
    DEFAULT_FRAME_LENGTH,
    FINAL_FRAME_OVERHEAD,
    IV_LENGTH,
    REGULAR_FRAME_OVERHEAD,
    SUITE_ID,
    TAG_LENGTH,
)
from fsrecrypt.format.frames import (
    DEFAULT_BATCH_BYTES,
    Encryptor,
    decrypt_stream,
    decrypt_stream_batched,
)
from fsrecrypt.format.header import (
    EncryptedDataKey,
    Header,
    build_header,
    derive_keys,
    parse_header,
    read_header,
    rewrap_header,
    serialize_context,
    verify_header,
)
from fsrecrypt.format.ranges import (
    RangePlan,
    ciphertext_size,
    decrypt_range,
    plaintext_size,
    plan_range,
)

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_FRAME_LENGTH",
    "FINAL_FRAME_OVERHEAD",
    "IV_LENGTH",
    "REGULAR_FRAME_OVERHEAD",
    "SUITE_ID",
    "TAG_LENGTH",
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
