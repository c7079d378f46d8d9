"""The ``fsrecrypt`` command line.

Start-up cost matters (operators run ``fsrecrypt health`` from cron and
monitoring): this module imports only click and the config/error modules.
Every command imports what it uses inside its own body, so ``--help`` or a
local-keyring ``encrypt`` never pays for boto3 or psycopg2.

Errors: a :class:`~fsrecrypt.errors.FsrecryptError` becomes one line on stderr
(what happened, what to do) and a non-zero exit; ``--debug`` adds the
traceback. Anything else is a bug and always shows its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from fsrecrypt import __version__
from fsrecrypt.config import Config, load_config
from fsrecrypt.errors import ConfigError, FsrecryptError, InputFileError

F = TypeVar("F", bound=Callable[..., Any])


class State:
    def __init__(self) -> None:
        self.config_path: str | None = None
        self.debug = False
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def services(self) -> Any:
        from fsrecrypt.pipeline import Services

        return Services(self.config)


def _set_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.ensure_object(State).config_path = value
    return value


def config_option(func: F) -> F:
    """``-c/--config`` on every command (and on the group), last one wins."""
    return click.option(
        "-c",
        "--config",
        "config_path",
        metavar="FILE",
        expose_value=False,
        is_eager=True,
        callback=_set_config,
        envvar="FSRECRYPT_CONFIG",
        help="Configuration file (default: $FSRECRYPT_CONFIG or /etc/fsrecrypt/fsrecrypt.toml).",
    )(func)


def default_user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


# Commands that live beside the code they drive. They are imported only when
# named (or listed by --help), and those modules import nothing heavy at top
# level, so start-up stays cheap.
LAZY_COMMANDS: dict[str, str] = {
    "run": "fsrecrypt.daemon:run_command",
    "health": "fsrecrypt.daemon:health_command",
    "serve": "fsrecrypt.cli.web:serve_command",
    "apikeys": "fsrecrypt.cli.web:apikeys_group",
    "audit": "fsrecrypt.cli.audit:audit_group",
    "rotate": "fsrecrypt.cli.rotate:rotate_command",
    "erase": "fsrecrypt.cli.erase:erase_command",
    "hold": "fsrecrypt.cli.erase:hold_group",
    "expire": "fsrecrypt.cli.erase:expire_command",
    "verify": "fsrecrypt.cli.verify:verify_command",
    "custody": "fsrecrypt.cli.custody:custody_command",
}


class FsrecryptGroup(click.Group):
    """Turns typed errors into one helpful line and an exit code; loads commands lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._available_lazy()))

    @staticmethod
    def _available_lazy() -> dict[str, str]:
        import importlib.util

        available = {}
        for name, target in LAZY_COMMANDS.items():
            module = target.partition(":")[0]
            if importlib.util.find_spec(module) is not None:
                available[name] = target
        return available

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in LAZY_COMMANDS:
            return command
        import importlib

        module_name, _, attr = LAZY_COMMANDS[cmd_name].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        return getattr(module, attr, None)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FsrecryptError as exc:
            state = ctx.find_object(State)
            if state is not None and state.debug:
                import traceback

                traceback.print_exc()
            click.echo(f"fsrecrypt: error: {exc.one_line()}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=FsrecryptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="fsrecrypt")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Encrypt FreeSWITCH call recordings the moment they stop.

    Recordings are stored in the AWS Encryption SDK message format (v2,
    suite 0x0478): any official ESDK with the key can read them.
    """
    state = ctx.ensure_object(State)
    state.debug = debug


def _state(ctx: click.Context) -> State:
    return ctx.ensure_object(State)


STDOUT = "-"
"""An output path of ``-`` means standard output (``get -o -``, ``decrypt IN -``)."""

_CLEANUP_SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")


@contextlib.contextmanager
def _removed_on_signal() -> Iterator[set[str]]:
    """Names put in the yielded set are unlinked if SIGTERM, SIGHUP or SIGINT arrives.

    Why: a ``get`` or ``decrypt`` killed mid-write must not leave a readable
    file of partial plaintext. The handler unlinks the pending names, puts
    the previous handlers back and lets the signal take its usual course
    (the process ends by it, so its exit status names it; SIGINT still
    raises KeyboardInterrupt). A signal set to be ignored (``nohup``) stays
    ignored. Signal handlers can only be installed from the main thread;
    elsewhere only the ordinary failure cleanup applies.
    """
    import signal
    import threading

    pending: set[str] = set()
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous: dict[int, Any] = {}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        previous.clear()

    def on_signal(signum: int, frame: Any) -> None:
        for name in list(pending):
            with contextlib.suppress(OSError):
                os.unlink(name)
        pending.clear()
        before = previous.get(signum, signal.SIG_DFL)
        restore()
        if callable(before):
            before(signum, frame)
        else:
            os.kill(os.getpid(), signum)

    for name in _CLEANUP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN or current is None:
            continue
        previous[signum] = current
        signal.signal(signum, on_signal)
    try:
        yield pending
    finally:
        restore()


def _open_unnamed(directory: Path, mode: int) -> int | None:
    """An unnamed file (O_TMPFILE) in ``directory``, or None where that is not possible.

    An unnamed file has no name until it is linked into place, so even a
    SIGKILL (or a crash) mid-write leaves nothing readable behind. It needs
    kernel and filesystem support, and /proc to link it by descriptor.
    """
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        fd = os.open(directory, flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError:
        # EOPNOTSUPP (filesystem), EISDIR/EINVAL (kernel) and real errors alike:
        # the named fallback reports a real error with its own message.
        return None
    if not os.path.exists(f"/proc/self/fd/{fd}"):
        os.close(fd)
        return None
    return fd


def _link_into_place(fd: int, target: Path, directory: Path, pending: set[str]) -> None:
    """Give the finished unnamed file ``fd`` the name ``target``.

    linkat(2) with AT_SYMLINK_FOLLOW on /proc/self/fd/N, the documented way
    for O_TMPFILE files (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
    os.link calls linkat only when given a directory descriptor (plain
    link(2) would try to link the /proc symlink itself), hence ``dir_fd``.
    link never replaces a name, so an existing ``target`` is replaced as
    before: via a hidden name beside it and an atomic rename, that name
    removed on a signal.
    """
    source = f"/proc/self/fd/{fd}"
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputFileError(f"cannot write in {directory}: {exc.strerror}") from None
    try:
        link = functools.partial(
            os.link, source, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=True
        )
        try:
            link(target.name)
            return
        except FileExistsError:
            pass
        except OSError as exc:
            raise InputFileError(f"cannot create {target}: {exc.strerror}") from None
        import secrets

        while True:
            name = f".{target.name}.{secrets.token_hex(6)}.part"
            tmp = str(directory / name)
            pending.add(tmp)
            try:
                link(name)
                break
            except FileExistsError:
                pending.discard(tmp)
            except OSError as exc:
                pending.discard(tmp)
                raise InputFileError(f"cannot create {target}: {exc.strerror}") from None
        try:
            os.replace(name, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            raise InputFileError(f"cannot replace {target}: {exc.strerror}") from None
        finally:
            pending.discard(tmp)
    finally:
        os.close(dir_fd)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str, mode: int = 0o600) -> Iterator[IO[bytes]]:
    """Write ``path`` all at once: it appears complete or not at all.

    A failed or interrupted decrypt must never leave partial plaintext
    behind. Where the filesystem allows, the bytes go to an unnamed file
    (O_TMPFILE, ``mode``) linked into place only once complete and synced,
    so nothing has a name even if the process is SIGKILLed. Elsewhere a
    hidden temp file (mode ``mode``) beside ``path`` is renamed into place,
    and removed on any failure and on SIGTERM, SIGHUP and SIGINT. An
    existing ``path`` is replaced only by a complete output, never touched
    by a failed one. ``-`` writes to standard output.
    """
    if path == STDOUT:
        stream = sys.stdout.buffer
        yield stream
        stream.flush()
        return
    target = Path(path)
    directory = target.parent
    with _removed_on_signal() as pending:
        fd = _open_unnamed(directory, mode)
        tmp: str | None = None
        if fd is None:
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=directory)
            except OSError as exc:
                raise InputFileError(f"cannot write in {directory}: {exc.strerror}") from None
            pending.add(tmp)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
                if tmp is None:
                    _link_into_place(out.fileno(), target, directory, pending)
            if tmp is not None:
                os.replace(tmp, target)
                pending.discard(tmp)
                tmp = None
            _fsync_directory(directory)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                pending.discard(tmp)
            raise


def _open_input(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror}") from None


# --- config ------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@config_option
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the configuration file and print the effective settings (no secrets)."""
    import dataclasses

    config = _state(ctx).config
    effective = dataclasses.asdict(config)
    effective["freeswitch"]["password"] = "***"  # noqa: S105 - redaction, not a secret
    click.echo(f"configuration OK ({config.source})")
    click.echo(json.dumps(effective, indent=2, default=str))


# --- database -----------------------------------------------------------------------


@main.command()
@config_option
@click.option("--create-db", is_flag=True, help="Create the database if it does not exist.")
@click.pass_context
def migrate(ctx: click.Context, create_db: bool) -> None:
    """Create or upgrade the database schema (idempotent, transactional)."""
    from fsrecrypt import db

    config = _state(ctx).config
    applied = db.migrate(config.database.dsn, create_db=create_db)
    if applied:
        for m in applied:
            click.echo(f"applied {m.version:04d}_{m.name}")
    else:
        click.echo("schema is up to date")


# --- keys -----------------------------------------------------------------------------


@main.group("keys")
def keys_group() -> None:
    """Manage tenant keys (local keyring or AWS KMS)."""


@keys_group.command("create")
@config_option
@click.argument("key_id")
@click.pass_context
def keys_create(ctx: click.Context, key_id: str) -> None:
    """Create KEY_ID (a new keyring entry, or a KMS key with alias/KEY_ID)."""
    from fsrecrypt.keys import build_key_provider

    provider = build_key_provider(_state(ctx).config.keys)
    created = provider.create_key(key_id)
    click.echo(created)


@keys_group.command("list")
@config_option
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """List key ids and creation dates (never key material)."""
    from fsrecrypt.keys import build_key_provider

    provider = build_key_provider(_state(ctx).config.keys)
    for info in provider.list_keys():
        click.echo(f"{info.key_id}\t{info.created_at or '-'}\t{info.description}".rstrip())


# --- tenants --------------------------------------------------------------------------------


@main.group("tenants")
def tenants_group() -> None:
    """Manage tenants and their keys."""


@tenants_group.command("add")
@config_option
@click.argument("name")
@click.option("--key", "key_id", required=True, help="Key id (local) or KMS key id/ARN/alias.")
@click.pass_context
def tenants_add(ctx: click.Context, name: str, key_id: str) -> None:
    """Add tenant NAME whose recordings are wrapped by KEY."""
    services = _state(ctx).services()
    services.keys.check_key(key_id)
    tenant = services.db.add_tenant(name, key_id)
    click.echo(json.dumps({"id": tenant.id, "name": tenant.name, "key": tenant.kms_key_id}))


@tenants_group.command("list")
@config_option
@click.pass_context
def tenants_list(ctx: click.Context) -> None:
    """List tenants."""
    services = _state(ctx).services()
    for t in services.db.tenants():
        click.echo(f"{t.name}\t{t.id}\t{t.kms_key_id}\t{t.created_at.isoformat()}")


# --- one-shot encrypt/decrypt (no database) ---------------------------------------------------


def _parse_context(pairs: tuple[str, ...]) -> dict[str, str]:
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--context {pair!r} is not KEY=VALUE", hint="Write it as key=value.")
        if key in context:
            raise ConfigError(f"--context {key!r} given twice", hint="Give each key once.")
        context[key] = value
    return context


@main.command()
@config_option
@click.argument("input_path", metavar="IN")
@click.argument("output_path", metavar="OUT")
@click.option("--key", "key_id", required=True, help="Key that wraps the data key.")
@click.option(
    "--context", "context_pairs", multiple=True, metavar="K=V", help="Encryption context."
)
@click.option("--frame-size", type=int, default=None, help="Frame length (multiple of 4096).")
@click.pass_context
def encrypt(
    ctx: click.Context,
    input_path: str,
    output_path: str,
    key_id: str,
    context_pairs: tuple[str, ...],
    frame_size: int | None,
) -> None:
    """Encrypt IN to OUT as an AWS Encryption SDK message (no database needed)."""
    from fsrecrypt import format as esdk
    from fsrecrypt.keys import build_key_provider

    config = _state(ctx).config
    context = _parse_context(context_pairs)
    frame = frame_size or config.pipeline.frame_size
    provider = build_key_provider(config.keys)
    data_key = provider.generate_data_key(key_id, context)
    encryptor = esdk.Encryptor(
        data_key.plaintext, [data_key.encrypted], context, frame_length=frame
    )
    with _open_input(input_path) as src, atomic_output(output_path, 0o644) as out:
        for chunk in encryptor.stream(src):
            out.write(chunk)
    click.echo(
        json.dumps(
            {
                "in": input_path,
                "out": output_path,
                "plaintext_bytes": encryptor.plaintext_length,
                "ciphertext_bytes": encryptor.ciphertext_length,
                "message_id": encryptor.header.message_id.hex(),
            }
        ),
        err=output_path == STDOUT,
    )


@main.command()
@config_option
@click.argument("input_path", metavar="IN")
@click.argument("output_path", metavar="OUT")
@click.pass_context
def decrypt(ctx: click.Context, input_path: str, output_path: str) -> None:
    """Decrypt the message IN to OUT ('-': stdout); nothing is left at OUT if anything fails.

    Not even when killed: see ``atomic_output``.
    """
    from fsrecrypt import format as esdk
    from fsrecrypt.keys import build_key_provider

    provider = build_key_provider(_state(ctx).config.keys)

    def data_key_for(header: esdk.Header) -> bytes:
        return provider.decrypt_data_key(header.encrypted_data_keys, header.encryption_context)

    written = 0
    with _open_input(input_path) as src, atomic_output(output_path) as out:
        for chunk in esdk.decrypt_stream(src, data_key_for):
            out.write(chunk)
            written += len(chunk)
    click.echo(
        json.dumps({"in": input_path, "out": output_path, "plaintext_bytes": written}),
        err=output_path == STDOUT,
    )


# --- the pipeline, one file at a time ------------------------------------------------------------


@main.command()
@config_option
@click.argument("file_path", metavar="FILE")
@click.option("--tenant", "tenant_name", required=True, help="Tenant name.")
@click.option("--call-uuid", default=None, help="FreeSWITCH call UUID to record with it.")
@click.option("--keep", is_flag=True, help="Keep the plaintext even if delete_plaintext is on.")
@click.option("--user", "user_id", default=None, help="User id for the audit log.")
@click.pass_context
def ingest(
    ctx: click.Context,
    file_path: str,
    tenant_name: str,
    call_uuid: str | None,
    keep: bool,
    user_id: str | None,
) -> None:
    """Encrypt, upload and record FILE for TENANT, then delete the plaintext."""
    from fsrecrypt.pipeline import ingest_file

    services = _state(ctx).services()
    try:
        outcome = ingest_file(
            services,
            os.path.abspath(file_path),
            tenant_name,
            call_uuid=call_uuid,
            user_id=user_id or default_user(),
            delete=False if keep else None,
        )
    finally:
        services.close()
    click.echo(
        json.dumps(
            {
                "recording_id": outcome.recording.id,
                "object_key": outcome.object_key,
                "plaintext_bytes": outcome.recording.file_size_bytes,
                "ciphertext_bytes": outcome.recording.encrypted_size_bytes,
                "plaintext_deleted": outcome.plaintext_deleted,
                "already_stored": outcome.already_stored,
            }
        )
    )


@main.command()
@config_option
@click.argument("recording_id")
@click.option(
    "-o", "--output", "output_path", required=True, help="Where to write the WAV ('-': stdout)."
)
@click.option("--user", "user_id", default=None, help="User id for the audit log.")
@click.pass_context
def get(ctx: click.Context, recording_id: str, output_path: str, user_id: str | None) -> None:
    """Fetch and decrypt RECORDING_ID to OUTPUT (audit-logged as a download)."""
    from fsrecrypt.pipeline import fetch_recording

    services = _state(ctx).services()
    try:
        with atomic_output(output_path) as out:
            opened = fetch_recording(
                services, recording_id, out, user_id=user_id or default_user(), action="download"
            )
    finally:
        services.close()
    click.echo(
        json.dumps(
            {
                "recording_id": recording_id,
                "out": output_path,
                "plaintext_bytes": opened.plaintext_size,
            }
        ),
        err=output_path == STDOUT,
    )


if __name__ == "__main__":  # pragma: no cover
    # `python -m fsrecrypt.cli`: run the importable module's `main`, not this
    # __main__ copy, so the lazily loaded command modules (which import
    # fsrecrypt.cli) share one State class with the group that parsed -c.
    from fsrecrypt.cli import main as _importable_main

    sys.exit(_importable_main())
