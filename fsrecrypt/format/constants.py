"""Wire constants of ESDK message format v2, algorithm suite 0x0478, framed.

The numbers, labels and struct layouts that the header, the frames and
random access all depend on live here once, so the three cannot disagree on
a length. ``docs/format.md`` describes each field these constants measure.
"""

from __future__ import annotations

import struct

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
