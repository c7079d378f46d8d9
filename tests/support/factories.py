"""Small builders shared by tests: WAV files, configs, services."""

from __future__ import annotations

import math
import os
import struct
import uuid
from pathlib import Path
from typing import Any

from fsrecrypt.config import Config, with_overrides


def make_wav(
    path: str | os.PathLike[str],
    seconds: float = 1.0,
    *,
    rate: int = 8000,
    channels: int = 1,
    seed: int = 0,
) -> bytes:
    """Write a 16-bit PCM WAV like FreeSWITCH's (44-byte header) and return its bytes.

    The audio is a tone plus a seed-dependent ramp, so two files never match
    by accident and a misplaced frame is caught by a byte comparison.
    """
    frames = int(seconds * rate)
    samples = bytearray()
    freq = 440 + 37 * (seed % 11)
    for i in range(frames):
        value = int(8000 * math.sin(2 * math.pi * freq * i / rate)) + ((i * (seed + 1)) % 97)
        samples += struct.pack("<h", max(-32768, min(32767, value))) * channels
    data = bytes(samples)
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack(
        "<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16
    )
    header += b"data" + struct.pack("<I", len(data))
    blob = header + data
    Path(path).write_bytes(blob)
    return blob


def local_config(tmp: Path, dsn: str, **sections: dict[str, Any]) -> Config:
    """Embedded defaults (local keyring + local store) rooted in ``tmp``."""
    recordings = tmp / "recordings"
    recordings.mkdir(exist_ok=True)
    base = {
        "database": {"dsn": dsn},
        "keys": {"provider": "local", "keyring": str(tmp / "keyring.json")},
        "storage": {"backend": "local", "path": str(tmp / "objects")},
        "freeswitch": {"recordings_dirs": (str(recordings),)},
        "metrics": {"listen": "", "heartbeat_file": str(tmp / "heartbeat")},
        "pipeline": {"frame_size": 4096},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return with_overrides(Config(), **base)


def s3_config(
    tmp: Path, dsn: str, endpoint_url: str, bucket: str, **sections: dict[str, Any]
) -> Config:
    """S3 store and KMS keys, both on the moto server."""
    merged = {
        "keys": {"provider": "aws-kms", "endpoint_url": endpoint_url, "region": "us-east-1"},
        "storage": {
            "backend": "s3",
            "bucket": bucket,
            "endpoint_url": endpoint_url,
            "region": "us-east-1",
            "part_size": 5 * 1024 * 1024,
        },
    }
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return local_config(tmp, dsn, **merged)


def write_config(path: Path, config: Config) -> Path:
    """Serialise a Config as TOML (flat values only), for CLI subprocesses."""
    import dataclasses

    lines = []
    for section in dataclasses.fields(config):
        if section.name == "source":
            continue
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(config, section.name)).items():
            lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
