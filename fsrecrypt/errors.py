"""Every error a user of fsrecrypt can hit, in one typed hierarchy.

Each error carries two things: what happened (the message) and what to do
about it (``hint``). The CLI prints both on one line and exits with
``exit_code``; the daemon logs both. Messages are built from identifiers
(key ids, object keys, recording ids, paths) only: key material, data keys and
plaintext never go into an exception, so nothing secret can leak through a
log line or a traceback.

``transient`` tells the pipeline whether retrying can help (a network blip,
a throttled KMS call, a restarting database) or not (tampered ciphertext, an
unknown tenant, a refused path).
"""

from __future__ import annotations


class FsrecryptError(Exception):
    """Base class: something fsrecrypt understood and can explain."""

    hint: str = "Run with --debug for details."
    exit_code: int = 1
    transient: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__

    def __str__(self) -> str:
        return self.message

    def one_line(self) -> str:
        """The line the CLI prints: what happened, then what to do."""
        return f"{self.message}. {self.hint}" if self.hint else self.message


# --- configuration -----------------------------------------------------------


class ConfigError(FsrecryptError):
    """The configuration file or an environment override is wrong."""

    hint = "Fix the named key in the configuration file (see conf/fsrecrypt.toml)."
    exit_code = 2


# --- message format and integrity -------------------------------------------


class FormatError(FsrecryptError):
    """The bytes are not a message this reader accepts."""

    hint = (
        "The object is not an intact fsrecrypt/AWS Encryption SDK message; "
        "restore it from a backup or an earlier version"
    )


class MalformedMessage(FormatError):
    """A header or frame field is out of range or inconsistent."""


class UnsupportedAlgorithmSuite(FormatError):
    """The message uses an algorithm suite this reader does not implement."""

    hint = (
        "fsrecrypt reads only suite 0x0478 (AES-256-GCM, HKDF-SHA512, key commitment, "
        "unsigned); decrypt this message with the official AWS Encryption SDK"
    )


class IntegrityError(FormatError):
    """Authentication failed: the bytes were altered, truncated or reordered."""

    hint = (
        "Treat the object as tampered or corrupted: do not use its contents; "
        "restore it from a backup or an earlier object version"
    )


class CommitmentMismatch(IntegrityError):
    """The data key does not commit to this message (wrong key or tampered header)."""


class AuthenticationFailed(IntegrityError):
    """A header or frame authentication tag did not verify."""


class TruncatedMessage(IntegrityError):
    """The message ended before its final frame."""


class TrailingData(IntegrityError):
    """Bytes follow the final frame."""


class ObjectMismatch(IntegrityError):
    """The object is not this recording's (swapped, misfiled) or its wrapped key does not fit.

    An integrity failure, not a key outage: the header names another
    recording or tenant, or the recording's wrapped data key does not
    authenticate under its own tenant/recording context. Retrying cannot help.
    """

    hint = (
        "Treat the object as swapped or tampered: do not play it; restore this "
        "recording's own object (or its row) from a backup or an earlier version"
    )


class RangeNotSatisfiable(FsrecryptError):
    """A requested plaintext byte range lies outside the recording."""

    hint = "Ask for a range inside the recording's size."


# --- keys ----------------------------------------------------------------------


class KeyAccessError(FsrecryptError):
    """A key could not be used (missing, refused, or the provider failed)."""

    hint = "Check the key provider configuration ([keys] in the config) and the key's permissions."


class KeyNotFound(KeyAccessError):
    """No key with this id exists in the provider."""

    hint = "Create it with 'fsrecrypt keys create KEY_ID' or fix the tenant's key id."


class KeyExists(KeyAccessError):
    """A key with this id already exists."""

    hint = "Pick another key id; existing keys are never overwritten."


class KeyringPermissionError(KeyAccessError):
    """The keyring file is readable by group or others (or otherwise unsafe)."""

    hint = "Run 'chmod 600' on the keyring file and make sure only the fsrecrypt user owns it."


class KeyProviderUnavailable(KeyAccessError):
    """The provider (KMS) could not be reached or throttled us; retrying may help."""

    hint = "Check network access to KMS and its endpoint_url; the operation can be retried."
    transient = True


class NoUsableDataKey(KeyAccessError):
    """None of the message's encrypted data keys can be decrypted by this provider."""

    hint = (
        "The recording was wrapped with a key this provider does not hold; "
        "check [keys] provider/keyring and the tenant's key history"
    )


# --- storage -------------------------------------------------------------------


class StorageError(FsrecryptError):
    """The object store failed."""

    hint = "Check the [storage] configuration and that the store is reachable and writable."
    transient = True


class ObjectNotFound(StorageError):
    """The object does not exist in the store."""

    hint = (
        "The recording's object is missing from the store; check the bucket/path and its versions"
    )
    transient = False


class ObjectExists(StorageError):
    """Refusing to overwrite an existing object."""

    hint = (
        "Object keys are unique per recording; this indicates a duplicate or a misconfigured prefix"
    )
    transient = False


# --- database ------------------------------------------------------------------


class DatabaseError(FsrecryptError):
    """PostgreSQL failed or is unreachable."""

    hint = "Check [database] dsn and that PostgreSQL is running; then run 'fsrecrypt migrate'."
    transient = True


class SchemaOutOfDate(DatabaseError):
    """The database schema is older than this version of fsrecrypt needs."""

    hint = "Run 'fsrecrypt migrate' to apply the pending migrations."
    transient = False


class NotFound(FsrecryptError):
    """A recording, tenant or other named record does not exist."""

    hint = "Check the id or name (list them with the matching 'list' command)."


class UnknownTenant(NotFound):
    """The tenant named by an event or a command does not exist."""

    hint = "Add it with 'fsrecrypt tenants add NAME --key KEY_ID'; the file was left in place."


class AlreadyExists(FsrecryptError):
    """The record being created exists already."""

    hint = "Use the existing record or pick another name."


class RecordingGone(FsrecryptError):
    """The recording was erased (crypto-shredded); it can never be decrypted again."""

    hint = "See the deletion receipt in the audit log."


class InvalidState(FsrecryptError):
    """The operation does not apply to a record in its current state."""

    hint = "Check the recording's status with 'fsrecrypt recordings show'."


# --- files and events ----------------------------------------------------------


class PathRefused(FsrecryptError):
    """A path is outside the recordings directories, a symlink, or not a regular file."""

    hint = (
        "Only regular files inside [freeswitch] recordings_dirs are processed; "
        "check the dialplan's record path"
    )
    # The daemon's refusal reason (fsrecrypt_refused_events{reason=...}).
    reason = "path"


class PathUnreadable(PathRefused):
    """A recordings directory or file the process may not read: a permission, not a forgery.

    Told apart from :class:`PathRefused` so an operator sees a permission
    problem (fix the owner or mode) instead of a suspected forged path.
    """

    hint = (
        "Give the fsrecrypt service user read and search access to the recordings "
        "directories and read/write access to the files (e.g. group freeswitch, mode 0770)"
    )
    reason = "unreadable"


class InputFileError(FsrecryptError):
    """A local input file could not be read or written."""

    hint = "Check that the path exists and that the fsrecrypt user may read/write it."


class SourceIncomplete(InputFileError):
    """A WAV's header does not match its size yet: the recorder is still writing it."""

    hint = "It is retried with backoff; a partial recording is never stored as done."
    transient = True


class SourceChanged(InputFileError):
    """The plaintext changed (grew, was rewritten or replaced) between open and delete."""

    hint = "The plaintext was kept; the recording is retried once the file is stable."
    transient = True


class EventError(FsrecryptError):
    """A FreeSWITCH event could not be understood."""

    hint = "The event was ignored; check FreeSWITCH's version and the event's headers."


class EslError(FsrecryptError):
    """The Event Socket connection failed."""

    hint = (
        "Check [freeswitch] host/port/password and event_socket.conf.xml "
        "(listen-ip, password, apply-inbound-acl)"
    )
    transient = True


class AuthError(FsrecryptError):
    """A caller is not authenticated or not allowed."""

    hint = "Provide a valid API key or signed URL."


class StateOwnershipError(FsrecryptError):
    """The CLI runs as root against state that belongs to the service user.

    Files root would create there (a keyring, objects, a signing key) would
    be root's, and the daemon running as the service user could then not
    read them: every recording would fail with "Permission denied".
    """

    hint = "Run the command as the owner of the state (sudo -u fsrecrypt fsrecrypt ...)."
