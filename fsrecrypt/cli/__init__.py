"""The ``fsrecrypt`` command line: the root group, and where each command lives.

Start-up cost matters (operators run ``fsrecrypt health`` from cron and
monitoring): this module imports only click and the error types. Every
command lives in a module of this package (one per command group, named in
``LAZY_COMMANDS``) that is imported only when the command is named;
``--help`` lists them from ``COMMAND_SUMMARIES`` without importing any.
Those modules import their domain code inside the command bodies, so a
local-keyring ``encrypt`` never pays for boto3, psycopg2, gevent or Flask
(``bench/bench_startup.py`` measures it).

Errors: a :class:`~fsrecrypt.errors.FsrecryptError` becomes one line on stderr
(what happened, what to do) and a non-zero exit; ``--debug`` adds the
traceback. Anything else is a bug and always shows its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fsrecrypt import __version__
from fsrecrypt.errors import FsrecryptError

if TYPE_CHECKING:  # pragma: no cover
    from fsrecrypt.config import Config
    from fsrecrypt.pipeline import Services

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """What the root group parsed (``-c``, ``--debug``); the config is read on first use."""

    def __init__(self) -> None:
        self.config_path: str | None = None
        self.debug = False
        self.allow_root = False
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            from fsrecrypt.config import load_config

            config = load_config(self.config_path)
            names = _command_names()
            if names and names[0] not in READ_ONLY_AS_ROOT:
                from fsrecrypt.ownership import check_state_owner

                check_state_owner(config, allow_root=self.allow_root, command=" ".join(names))
            self._config = config
        return self._config

    def services(self) -> Services:
        from fsrecrypt.pipeline import Services

        return Services(self.config)


# Commands that only read and report: root may run them against the service's
# state (everything else refuses, see fsrecrypt.ownership).
READ_ONLY_AS_ROOT = frozenset({"health", "config"})


def _command_names() -> list[str]:
    """The command path below the root group, e.g. ``["keys", "create"]``."""
    ctx = click.get_current_context(silent=True)
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return names[::-1]


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


# Every command, by the module that holds it. A module is imported only when
# one of its commands is named, and those modules import nothing heavy at top
# level, so start-up stays cheap.
LAZY_COMMANDS: dict[str, str] = {
    "run": "fsrecrypt.cli.daemon:run_command",
    "health": "fsrecrypt.cli.daemon:health_command",
    "serve": "fsrecrypt.cli.web:serve_command",
    "apikeys": "fsrecrypt.cli.web:apikeys_group",
    "audit": "fsrecrypt.cli.audit:audit_group",
    "rotate": "fsrecrypt.cli.rotate:rotate_command",
    "erase": "fsrecrypt.cli.erase:erase_command",
    "hold": "fsrecrypt.cli.erase:hold_group",
    "expire": "fsrecrypt.cli.erase:expire_command",
    "verify": "fsrecrypt.cli.verify:verify_command",
    "config": "fsrecrypt.cli.admin:config_group",
    "migrate": "fsrecrypt.cli.admin:migrate_command",
    "keys": "fsrecrypt.cli.keys:keys_group",
    "tenants": "fsrecrypt.cli.tenants:tenants_group",
    "encrypt": "fsrecrypt.cli.files:encrypt_command",
    "decrypt": "fsrecrypt.cli.files:decrypt_command",
    "ingest": "fsrecrypt.cli.files:ingest_command",
    "get": "fsrecrypt.cli.files:get_command",
    "custody": "fsrecrypt.cli.custody:custody_command",
    "recordings": "fsrecrypt.cli.recordings:recordings_group",
    "retry": "fsrecrypt.cli.recordings:retry_command",
    "jobs": "fsrecrypt.cli.jobs:jobs_group",
    "worker": "fsrecrypt.cli.jobs:worker_command",
    "backfill": "fsrecrypt.cli.backfill:backfill_command",
}

# What ``fsrecrypt --help`` lists for each command: its help's first sentence,
# kept here so listing the commands imports none of their modules (that
# halves the start-up time of --help). tests/test_cli.py checks that each
# matches its command's own help and that the listing is what click prints.
COMMAND_SUMMARIES: dict[str, str] = {
    "run": "Run the daemon: store every recording FreeSWITCH finishes (Ctrl-C/SIGTERM to stop).",
    "health": "Check FreeSWITCH, database, keys, store, backlog and the daemon (exit 0/1/2).",
    "serve": "Serve the playback API and page (streaming decryption with seek).",
    "apikeys": "Manage the playback API keys (stored only as hashes).",
    "audit": "Check and export the tamper-evident access log.",
    "rotate": "Move a tenant to a new key without re-encrypting any audio.",
    "erase": "Permanently destroy recordings (crypto-shredding) and print a deletion receipt.",
    "hold": "Legal holds: recordings on hold cannot be erased or expired.",
    "expire": "Erase stored recordings older than [retention] days that are not on legal hold.",
    "verify": "Prove stored recordings are intact and readable.",
    "config": "Inspect the configuration.",
    "migrate": "Create or upgrade the database schema (idempotent, transactional).",
    "keys": "Manage tenant keys (local keyring, AWS KMS or KMS-protected branch keys).",
    "tenants": "Manage tenants and their keys.",
    "encrypt": "Encrypt IN to OUT as an AWS Encryption SDK message (no database needed).",
    "decrypt": (
        "Decrypt the message IN to OUT ('-': stdout); nothing is left at OUT if anything fails."
    ),
    "ingest": "Encrypt, upload and record FILE for TENANT, then delete the plaintext.",
    "get": "Fetch and decrypt RECORDING_ID to OUTPUT (audit-logged as a download).",
    "custody": "Print a recording's evidence: creation, storage, fingerprint, events, anchors.",
    "recordings": "List and inspect recordings, and what is still waiting as plaintext.",
    "retry": "Queue failed recordings again; the daemon stores them at its next sweep (audited).",
    "jobs": "Bulk jobs: list, show progress, cancel, retry failed items.",
    "worker": "Work items of every bulk job (any number, on any host; SIGTERM drains).",
    "backfill": "Encrypt an existing archive of plaintext recordings, then remove the plaintext.",
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

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The "Commands" section as click writes it, from ``COMMAND_SUMMARIES``.

        A command with a summary is listed through a stand-in carrying that
        text, so click shortens it exactly as it would the real help; only a
        command without one has its module imported.
        """
        commands: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            summary = None if name in self.commands else COMMAND_SUMMARIES.get(name)
            command = (
                click.Command(name, help=summary)
                if summary is not None
                else self.get_command(ctx, name)
            )
            if command is not None and not command.hidden:
                commands.append((name, command))
        if not commands:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in commands)
        rows = [(name, command.get_short_help_str(limit)) for name, command in commands]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

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
@click.option(
    "--allow-root",
    is_flag=True,
    envvar="FSRECRYPT_ALLOW_ROOT",
    help="Run as root against state owned by the service user (recovery only).",
)
@click.version_option(__version__, prog_name="fsrecrypt")
@click.pass_context
def main(ctx: click.Context, debug: bool, allow_root: bool) -> None:
    """Encrypt FreeSWITCH call recordings the moment they stop.

    Recordings are stored in the AWS Encryption SDK message format (v2,
    suite 0x0478): any official ESDK with the key can read them.
    """
    state = ctx.ensure_object(State)
    state.debug = debug
    state.allow_root = allow_root


if __name__ == "__main__":  # pragma: no cover
    # `python -m fsrecrypt.cli`: run the importable module's `main`, not this
    # __main__ copy, so the lazily loaded command modules (which import
    # fsrecrypt.cli) share one State class with the group that parsed -c.
    from fsrecrypt.cli import main as _importable_main

    sys.exit(_importable_main())
