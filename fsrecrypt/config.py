"""Configuration: one TOML file, every key overridable from the environment.

Why a strict schema: a daemon that guesses around a typo (``delete_plantext``)
silently does the wrong thing with compliance data. Unknown sections, unknown
keys and values of the wrong type or range fail at start, naming the file, the
key and the reason.

Environment overrides are ``FSRECRYPT_<SECTION>_<KEY>`` (upper case), e.g.
``FSRECRYPT_DATABASE_DSN``. They let systemd credentials and containers set
secrets without writing them into the file. A key ending in ``_file`` (such as
``password_file``) names a file whose content is the secret, which is how
``LoadCredential=`` hands secrets over (``$CREDENTIALS_DIRECTORY``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fsrecrypt.config_auth import AuthConfig
from fsrecrypt.config_evidence import AuditConfig, PciConfig, RetentionConfig
from fsrecrypt.errors import ConfigError
from fsrecrypt.numbers import NumberError, parse_int

DEFAULT_CALL_UUID_PATTERN = (
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
DEFAULT_CONFIG_PATHS = (Path("/etc/fsrecrypt/fsrecrypt.toml"),)
ENV_CONFIG = "FSRECRYPT_CONFIG"
ENV_ALLOW_ROOT = "FSRECRYPT_ALLOW_ROOT"  # read by the CLI (fsrecrypt.ownership)


@dataclass(frozen=True)
class FreeswitchConfig:
    host: str = "127.0.0.1"
    port: int = 8021
    password: str = "ClueCon"  # noqa: S105 - FreeSWITCH's well-known default
    password_file: str = ""
    recordings_dirs: tuple[str, ...] = ("/var/lib/freeswitch/recordings",)
    tenant_variable: str = "variable_fsrecrypt_tenant"
    default_tenant: str = ""
    consent_variable: str = "variable_recording_consent"
    connect_timeout: float = 5.0
    command_timeout: float = 5.0
    liveness_interval: float = 5.0
    backoff_cap: float = 30.0
    # Where a file the sweep adopts (no RECORD_STOP seen) gets its call UUID:
    # searched in the file's name; group 1 if the pattern has one, else the
    # whole match. Default: the first UUID in the name. "" = none.
    call_uuid_pattern: str = DEFAULT_CALL_UUID_PATTERN

    def validate(self) -> None:
        _check_port("freeswitch.port", self.port)
        if self.call_uuid_pattern:
            try:
                compiled = re.compile(self.call_uuid_pattern)
            except re.error as exc:
                raise ValueError(f"call_uuid_pattern is not a regular expression: {exc}") from None
            if compiled.groups > 1:
                raise ValueError(
                    "call_uuid_pattern: use at most one capturing group (the call UUID); "
                    "write other groups as (?:...)"
                )
        if not self.recordings_dirs:
            raise ValueError("recordings_dirs: at least one directory is needed")
        for d in self.recordings_dirs:
            if not os.path.isabs(d):
                raise ValueError(f"recordings_dirs: {d!r} is not an absolute path")

    def resolved_password(self) -> str:
        return _read_secret(self.password_file) if self.password_file else self.password


@dataclass(frozen=True)
class DatabaseConfig:
    dsn: str = "postgresql://postgres@127.0.0.1:5432/fsrecrypt"
    connect_timeout: float = 5.0

    def validate(self) -> None:
        if not self.dsn:
            raise ValueError("dsn must not be empty")


KEY_PROVIDERS = ("local", "aws-kms", "aws-kms-hierarchy")
_KMS_KEY_ARN = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]{1,128}")
_DDB_TABLE = re.compile(r"[A-Za-z0-9_.-]{3,255}")


@dataclass(frozen=True)
class KeysConfig:
    provider: str = "local"
    keyring: str = "/var/lib/fsrecrypt/keyring.json"
    # Where raw-aes:<id> escrow keys live (ESDK raw AES, same file format as
    # `keyring`); empty: the `keyring` file itself.
    escrow_keyring: str = ""
    region: str = "us-east-1"
    endpoint_url: str = ""
    # provider = "aws-kms-hierarchy": branch keys in a DynamoDB key store, each
    # protected by a KMS key and cached for cache_ttl seconds (see README.rst).
    key_store_table: str = ""
    key_store_kms_key: str = ""
    cache_ttl: int = 900

    def validate(self) -> None:
        if self.provider not in KEY_PROVIDERS:
            raise ValueError(
                f"provider must be 'local', 'aws-kms' or 'aws-kms-hierarchy', "
                f"not {self.provider[:40]!r}"
            )
        if not 1 <= self.cache_ttl <= 86400:
            raise ValueError("cache_ttl must be between 1 and 86400 seconds")
        if self.provider != "aws-kms-hierarchy":
            return
        if not _DDB_TABLE.fullmatch(self.key_store_table):
            raise ValueError(
                "key_store_table must name the DynamoDB key store table "
                "(3-255 characters of A-Z a-z 0-9 _ . -) when provider = 'aws-kms-hierarchy'"
            )
        if not _KMS_KEY_ARN.fullmatch(self.key_store_kms_key):
            raise ValueError(
                "key_store_kms_key must be the ARN of the KMS key that protects branch keys "
                "(arn:aws:kms:REGION:ACCOUNT:key/ID; aliases are not accepted by the key store)"
            )


OBJECT_LOCK_MODES = ("", "governance", "compliance")


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "local"
    path: str = "/var/lib/fsrecrypt/objects"
    bucket: str = ""
    prefix: str = "recordings/"
    region: str = "us-east-1"
    endpoint_url: str = ""
    sse: str = ""
    sse_kms_key_id: str = ""
    part_size: int = 8 * 1024 * 1024
    object_lock: str = ""
    governance_bypass: bool = False
    # Connections the S3 client keeps for reuse (botocore's default is 10). A
    # request beyond them opens (and then drops) a new connection; `fsrecrypt
    # serve` raises this to its number of concurrent requests.
    max_pool_connections: int = 10

    def validate(self) -> None:
        if not 1 <= self.max_pool_connections <= 10_000:
            raise ValueError("max_pool_connections must be between 1 and 10000")
        if self.backend not in ("local", "s3"):
            raise ValueError(f"backend must be 'local' or 's3', not {self.backend!r}")
        if self.object_lock not in OBJECT_LOCK_MODES:
            raise ValueError(
                f"object_lock must be '', 'governance' or 'compliance', "
                f"not {self.object_lock[:40]!r}"
            )
        if self.object_lock and self.backend != "s3":
            raise ValueError("object_lock needs backend = 's3' (an S3 Object Lock bucket)")
        if self.backend == "s3" and not self.bucket:
            raise ValueError("bucket is required when backend = 's3'")
        if self.sse not in ("", "AES256", "aws:kms"):
            raise ValueError(f"sse must be '', 'AES256' or 'aws:kms', not {self.sse!r}")
        if self.part_size < 5 * 1024 * 1024:
            raise ValueError("part_size must be at least 5 MiB (S3's minimum part size)")
        if self.prefix.startswith("/"):
            raise ValueError("prefix must not start with '/'")


@dataclass(frozen=True)
class PipelineConfig:
    frame_size: int = 65536
    concurrency: int = 4
    delete_plaintext: bool = True
    max_attempts: int = 5
    retry_base: float = 1.0
    retry_cap: float = 60.0
    sweep_interval: float = 300.0
    quiet_period: float = 60.0
    shutdown_grace: float = 30.0
    # A failed row (its plaintext kept) is tried again after this many seconds,
    # doubling after each further failure up to the cap; 0 = only `fsrecrypt retry`.
    failed_retry_base: float = 600.0
    failed_retry_cap: float = 86400.0

    def validate(self) -> None:
        if self.frame_size <= 0 or self.frame_size % 4096:
            raise ValueError("frame_size must be a positive multiple of 4096")
        if self.frame_size > 16 * 1024 * 1024:
            raise ValueError("frame_size must be at most 16 MiB")
        if not 1 <= self.concurrency <= 256:
            raise ValueError("concurrency must be between 1 and 256")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.failed_retry_base <= self.failed_retry_cap:
            raise ValueError(
                "failed_retry_base must be between 0 (no automatic retry) and failed_retry_cap"
            )


@dataclass(frozen=True)
class PlaybackConfig:
    listen: str = "127.0.0.1:8080"
    url_ttl: int = 900
    signing_key_file: str = "/var/lib/fsrecrypt/url-signing.key"
    # Connection limits of `fsrecrypt serve` (slow or idle clients must not
    # exhaust the server): see conf/fsrecrypt.toml.
    max_connections: int = 1000
    max_connections_per_client: int = 64
    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    # Uploads (POST /v1/recordings): the largest body taken (413 above it) and
    # how long one upload may take in all; a gap of idle_timeout without a
    # byte ends it too.
    max_upload_bytes: int = 2 * 1024**3
    upload_timeout: float = 3600.0
    # Proxies whose X-Forwarded-For/-Proto are believed (CIDRs); from any
    # other peer those headers are ignored.
    trusted_proxies: tuple[str, ...] = ()
    # Native TLS (both or neither): PEM certificate chain and its key.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Prometheus /metrics of `fsrecrypt serve` ("" = none); not the daemon's port.
    metrics_listen: str = "127.0.0.1:9465"

    def validate(self) -> None:
        _check_listen("playback.listen", self.listen)
        if self.metrics_listen:
            _check_listen("playback.metrics_listen", self.metrics_listen)
        if not 1 <= self.max_upload_bytes <= 1 << 40:
            raise ValueError("max_upload_bytes must be between 1 and 2**40")
        if not 1 <= self.upload_timeout <= 86400:
            raise ValueError("upload_timeout must be between 1 second and 1 day")
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {cidr[:60]!r} is not an IP address or CIDR"
                ) from None
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.url_ttl <= 0:
            raise ValueError("url_ttl must be positive")
        if not 1 <= self.max_connections <= 100_000:
            raise ValueError("max_connections must be between 1 and 100000")
        if not 1 <= self.max_connections_per_client <= self.max_connections:
            raise ValueError("max_connections_per_client must be between 1 and max_connections")
        if not 0.1 <= self.header_timeout <= 300:
            raise ValueError("header_timeout must be between 0.1 and 300 seconds")
        if not 0.1 <= self.idle_timeout <= 3600:
            raise ValueError("idle_timeout must be between 0.1 and 3600 seconds")


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"
    heartbeat_file: str = "/run/fsrecrypt/heartbeat"

    def validate(self) -> None:
        if self.listen:
            _check_listen("metrics.listen", self.listen)


@dataclass(frozen=True)
class JobsConfig:
    """Bulk jobs (``fsrecrypt worker``, and commands working their own job).

    An item is held under a ``lease_seconds`` lease renewed every
    ``heartbeat_interval``: a worker that dies loses its items to others
    within ``lease_seconds`` plus one ``poll_interval``.
    """

    lease_seconds: float = 30.0
    heartbeat_interval: float = 10.0
    batch_size: int = 10
    concurrency: int = 4
    max_attempts: int = 5
    poll_interval: float = 2.0
    metrics_listen: str = "127.0.0.1:9466"

    def validate(self) -> None:
        if not 5 <= self.lease_seconds <= 3600:
            raise ValueError("lease_seconds must be between 5 and 3600")
        if not 0.5 <= self.heartbeat_interval <= self.lease_seconds / 2:
            raise ValueError("heartbeat_interval must be between 0.5 and lease_seconds / 2")
        if not 1 <= self.batch_size <= 1000:
            raise ValueError("batch_size must be between 1 and 1000")
        if not 1 <= self.concurrency <= 256:
            raise ValueError("concurrency must be between 1 and 256")
        if not 1 <= self.max_attempts <= 100:
            raise ValueError("max_attempts must be between 1 and 100")
        if not 0.05 <= self.poll_interval <= 60:
            raise ValueError("poll_interval must be between 0.05 and 60 seconds")
        if self.metrics_listen:
            _check_listen("jobs.metrics_listen", self.metrics_listen)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "json"

    def validate(self) -> None:
        if self.level not in ("debug", "info", "warning", "error"):
            raise ValueError("level must be debug, info, warning or error")
        if self.format not in ("json", "console"):
            raise ValueError("format must be 'json' or 'console'")


@dataclass(frozen=True)
class Config:
    freeswitch: FreeswitchConfig = field(default_factory=FreeswitchConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    playback: PlaybackConfig = field(default_factory=PlaybackConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    pci: PciConfig = field(default_factory=PciConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    source: str = "<defaults>"


def _check_port(name: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{name} must be a TCP port (1-65535)")


def _check_listen(name: str, listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    try:
        number = parse_int(port, max_digits=5)
    except NumberError:
        number = -1
    if not sep or not host or number < 0:
        raise ValueError(f"{name} must look like HOST:PORT, got {listen[:100]!r}")
    _check_port(name, number)


def _read_secret(path: str) -> str:
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    candidate = Path(path)
    if not candidate.is_absolute() and cred_dir:
        candidate = Path(cred_dir) / candidate
    try:
        return candidate.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read secret file {candidate}: {exc.strerror}",
            hint="Check the path, or the systemd LoadCredential= line that provides it.",
        ) from None


_FLOAT_CHARS = frozenset("0123456789.eE+-_")


def _shown(value: Any) -> str:
    """A config value for an error message, cut short (an env var can be huge)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML or environment value to the field's type, or explain why not."""
    origin = get_origin(typ)
    if origin is tuple:
        (inner, _ellipsis) = get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, inner, where) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return parse_int(value.strip().replace("_", ""), allow_negative=True)
            except NumberError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {_shown(value)}")
    if typ is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and value.strip() and _FLOAT_CHARS.issuperset(value.strip()):
            with contextlib.suppress(ValueError, OverflowError):
                number = float(value.strip()) if len(value) <= 40 else None
        # nan and inf (TOML allows both) would slip past every "<= 0" check.
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {_shown(value)}")
        return number
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type")  # pragma: no cover


def _build_section(cls: type, raw: Mapping[str, Any], section: str, source: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key [{section}] {key}",
                hint=f"Known keys in [{section}]: {', '.join(sorted(known))}.",
            )
        values[key] = _coerce(value, hints[key], f"{source}: [{section}] {key}")
    for key in known:
        env_name = f"FSRECRYPT_{section.upper()}_{key.upper()}"
        if env_name in os.environ:
            values[key] = _coerce(os.environ[env_name], hints[key], f"environment {env_name}")
    try:
        obj = cls(**values)
        obj.validate()
    except ValueError as exc:
        raise ConfigError(f"{source}: [{section}] {exc}") from None
    return obj


_READ_HINT = (
    "Run the command as the service user (sudo -u fsrecrypt fsrecrypt ...), or give "
    "that user read access: the config is root:fsrecrypt 0640 in a directory root:fsrecrypt 0750."
)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config file (or only defaults + environment when there is none).

    Lookup order: the explicit ``path``, ``$FSRECRYPT_CONFIG``, then
    ``/etc/fsrecrypt/fsrecrypt.toml``. An explicitly named file that does not
    exist is an error; a missing default file is not.
    """
    explicit = path or os.environ.get(ENV_CONFIG)
    raw: dict[str, Any] = {}
    source = "<defaults>"
    candidates = [Path(explicit)] if explicit else list(DEFAULT_CONFIG_PATHS)
    for candidate in candidates:
        try:
            present = candidate.exists()
        except OSError as exc:  # e.g. /etc/fsrecrypt is 0750 and we are not in its group
            raise ConfigError(
                f"cannot look for {candidate}: {exc.strerror}",
                hint=_READ_HINT,
            ) from None
        if not present:
            if explicit:
                raise ConfigError(
                    f"configuration file {candidate} does not exist",
                    hint="Pass an existing file with -c, or copy conf/fsrecrypt.toml.",
                )
            continue
        try:
            raw = tomllib.loads(candidate.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{candidate}: invalid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {candidate}: {exc.strerror}", hint=_READ_HINT) from None
        source = str(candidate)
        break
    sections = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "source"}
    hints = get_type_hints(Config)
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(
                f"{source}: unknown section [{name}]",
                hint=f"Known sections: {', '.join(sections)}.",
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
    built = {
        name: _build_section(hints[name], raw.get(name, {}), name, source) for name in sections
    }
    return Config(**built, source=source)


def with_overrides(config: Config, **sections: Mapping[str, Any]) -> Config:
    """Return a copy with some keys replaced (validated like the file's)."""
    changed: dict[str, Any] = {}
    for name, updates in sections.items():
        current = getattr(config, name)
        merged = {**dataclasses.asdict(current), **updates}
        changed[name] = _build_section(type(current), merged, name, "<override>")
    return dataclasses.replace(config, **changed)


REDACTED = "***"
_DSN_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password (URL userinfo, ``?password=``, ``password=``) shown as ``***``."""
    scheme, sep, rest = dsn.partition("://")
    if sep:
        netloc, slash, tail = rest.partition("/")
        userinfo, at, hostport = netloc.rpartition("@")
        if at and ":" in userinfo:
            netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{hostport}"
        dsn = f"{scheme}{sep}{netloc}{slash}{tail}"
    return _DSN_PASSWORD.sub(lambda m: m.group(1) + REDACTED, dsn)


def effective_settings(config: Config) -> dict[str, Any]:
    """The settings in force, as plain data, with every secret replaced by ``***``.

    What ``fsrecrypt config check`` prints, so it may be pasted into a
    ticket: the FreeSWITCH password and any password inside the database
    DSN are never shown (``*_file`` settings are paths, not secrets).
    """
    settings = dataclasses.asdict(config)
    settings["freeswitch"]["password"] = REDACTED
    settings["database"]["dsn"] = redact_dsn(config.database.dsn)
    return settings


def known_environment_names() -> set[str]:
    """Every ``FSRECRYPT_*`` variable fsrecrypt reads: one per key, ``FSRECRYPT_CONFIG`` and
    ``FSRECRYPT_ALLOW_ROOT``."""
    names = {ENV_CONFIG, ENV_ALLOW_ROOT}
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        for key in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            names.add(f"FSRECRYPT_{section.name.upper()}_{key.name.upper()}")
    return names


def config_warnings(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """What is valid but will not work as meant; ``fsrecrypt config check`` prints these.

    Why warnings, not errors: a recordings directory may legitimately be
    created later (FreeSWITCH creates it), and the check may run as another
    user than the service. But a typo in an environment override
    (``FSRECRYPT_PIPELINE_MAX_ATTEMPT``) is otherwise silently ignored, and
    a directory the daemon cannot read is silently never swept.
    """
    env = os.environ if environ is None else environ
    warnings: list[str] = []
    for d in config.freeswitch.recordings_dirs:
        if not os.path.isdir(d):
            warnings.append(f"recordings directory {d} does not exist (or is not a directory)")
        elif not os.access(d, os.R_OK | os.X_OK):
            warnings.append(
                f"recordings directory {d} is not readable by this user (uid {os.getuid()}); "
                "the daemon's user needs read and search access"
            )
    for cidr in config.playback.trusted_proxies:
        network = ipaddress.ip_network(cidr, strict=False)
        if network.prefixlen == 0 or network.is_global:
            warnings.append(
                f"[playback] trusted_proxies {cidr} includes addresses on the internet: "
                "anyone there can write the client address the audit log records; "
                "list only your proxies' addresses"
            )
    known = known_environment_names()
    for name in sorted(env):
        if name.upper().startswith("FSRECRYPT_") and name not in known:
            shown = name.encode("unicode_escape").decode("ascii")[:100]
            close = difflib.get_close_matches(name.upper()[:200], sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"environment variable {shown} matches no setting and is ignored{hint}")
    return warnings
