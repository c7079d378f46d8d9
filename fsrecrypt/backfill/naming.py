"""What a backfill learns from a name alone: the source, the call, the tenant, the media type.

Pure functions, no I/O: the listing runs them on every name it streams, and
the item worker trusts only what they return. Names come from whoever could
write the archive, so every pattern is compiled ``re.ASCII`` (``\\d`` is
``[0-9]``: an Arabic-Indic or full-width digit never makes a call UUID or a
tenant), and every value taken from a name is checked for the form the rest
of fsrecrypt expects before it is used.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from fsrecrypt.errors import ConfigError

UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
"""The default ``--call-uuid-from``: the first UUID in the file's base name."""

CALL_UUID_LIMIT = 128
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", re.ASCII)
_CALL_UUID_TEXT = re.compile(r"[\w.:@-]{1,128}", re.ASCII)

# Audio stored as it is, by extension, with the leading bytes that type starts with.
MEDIA_TYPES: dict[str, tuple[str, tuple[bytes, ...]]] = {
    ".wav": ("audio/wav", (b"RIFF",)),
    ".mp3": ("audio/mpeg", (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xe3")),
    ".ogg": ("audio/ogg", (b"OggS",)),
    ".oga": ("audio/ogg", (b"OggS",)),
    ".opus": ("audio/opus", (b"OggS",)),
    ".flac": ("audio/flac", (b"fLaC",)),
}


class BackfillSourceError(ConfigError):
    """A SOURCE argument is not a directory path or an ``s3://bucket/prefix`` URL."""

    hint = "Give a directory (absolute or relative) or s3://BUCKET/PREFIX."


@dataclass(frozen=True)
class SourceSpec:
    """One SOURCE argument: ``kind`` is ``dir`` (``root`` a path) or ``s3`` (bucket + prefix)."""

    kind: str
    root: str = ""
    bucket: str = ""
    prefix: str = ""

    @property
    def label(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.kind == "s3" else self.root


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", re.ASCII)


def parse_source(text: str) -> SourceSpec:
    """``s3://bucket/prefix`` or a directory path (made absolute, not resolved)."""
    if "\0" in text:
        raise BackfillSourceError(f"source {text!r} contains a NUL character")
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise BackfillSourceError(f"{text!r}: {bucket!r} is not an S3 bucket name")
        return SourceSpec("s3", bucket=bucket, prefix=prefix)
    if "://" in text:
        raise BackfillSourceError(f"{text!r}: only directories and s3:// sources are supported")
    return SourceSpec("dir", root=posixpath.normpath(posixpath.abspath(text)))


def compile_pattern(pattern: str, what: str) -> re.Pattern[str]:
    """A user's pattern, ASCII-only classes; a typed error naming the option if it is invalid."""
    try:
        return re.compile(pattern, re.ASCII)
    except re.error as exc:
        raise ConfigError(
            f"{what} {pattern!r} is not a valid regular expression ({exc})",
            hint="Use Python regular expression syntax; quote it for the shell.",
        ) from None


@dataclass(frozen=True)
class Naming:
    """How names become calls and tenants for one backfill (the command's options).

    ``tenant``: one tenant for everything, or ``tenant_from`` with a named
    group ``tenant``. ``call_uuid_from``: searched in the name below the
    source; its group ``call`` (or group 1, or the whole match) is the call
    UUID. Without it, the first UUID in the base name is.
    """

    tenant: str | None = None
    tenant_from: str | None = None
    call_uuid_from: str | None = None

    def validate(self) -> None:
        if (self.tenant is None) == (self.tenant_from is None):
            raise ConfigError(
                "give exactly one of --tenant and --tenant-from",
                hint="--tenant NAME stores everything for NAME; --tenant-from REGEX takes the "
                "tenant from each name's (?P<tenant>...) group.",
            )
        if self.tenant is not None and not TENANT_NAME.fullmatch(self.tenant):
            raise ConfigError(f"--tenant {self.tenant!r} is not a tenant name")
        if self.tenant_from is not None:
            pattern = compile_pattern(self.tenant_from, "--tenant-from")
            if "tenant" not in pattern.groupindex:
                raise ConfigError(
                    f"--tenant-from {self.tenant_from!r} has no (?P<tenant>...) group",
                    hint="Name the part of the path that is the tenant, e.g. "
                    "'^(?P<tenant>[^/]+)/'.",
                )
        if self.call_uuid_from is not None:
            compile_pattern(self.call_uuid_from, "--call-uuid-from")

    def tenant_for(self, name: str) -> str | None:
        """The tenant a name (relative to its source) belongs to; None if it names none."""
        if self.tenant is not None:
            return self.tenant
        match = compile_pattern(self.tenant_from or "", "--tenant-from").search(name)
        found = match.group("tenant") if match else None
        return found if found and TENANT_NAME.fullmatch(found) else None

    def call_uuid_for(self, name: str) -> str | None:
        """The call UUID a name holds (None if none, or if what matched is not one)."""
        if self.call_uuid_from is None:
            match = re.search(UUID_PATTERN, posixpath.basename(name), re.ASCII)
            return match.group(0).lower() if match else None
        match = compile_pattern(self.call_uuid_from, "--call-uuid-from").search(name)
        if match is None:
            return None
        if "call" in match.re.groupindex:
            found = match.group("call")
        else:
            found = match.group(1) if match.re.groups else match.group(0)
        return found if found and _CALL_UUID_TEXT.fullmatch(found) else None


def media_type(name: str, head: bytes) -> tuple[str | None, str]:
    """``(content type, why)``: the audio type a file is stored as, or None and why not.

    The extension says what it claims to be and the first bytes must agree,
    so a renamed document is not stored as audio (and then deleted) by
    mistake. A RIFF/WAVE file is a WAV whatever its name.
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav", "wav"
    ext = posixpath.splitext(name)[1].lower()
    known = MEDIA_TYPES.get(ext)
    if known is None:
        return None, f"not audio (extension {ext or 'none'!r})"
    content_type, magics = known
    if ext == ".wav":
        return None, "a .wav file that is not RIFF/WAVE"
    if not any(head.startswith(m) for m in magics):
        return None, f"content does not look like {ext} audio"
    return content_type, ext[1:]
