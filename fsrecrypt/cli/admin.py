"""``fsrecrypt config check`` and ``fsrecrypt migrate``: setting up a host."""

from __future__ import annotations

import json

import click

from fsrecrypt.cli import State, config_option


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@config_option
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the configuration file and print the effective settings (no secrets).

    Valid settings that will not work as meant (a recordings directory that is
    missing or unreadable, an ``FSRECRYPT_*`` variable that matches no key)
    are printed as warnings on stderr; the exit code stays 0.
    """
    from fsrecrypt.config import config_warnings, effective_settings

    config = ctx.ensure_object(State).config
    click.echo(f"configuration OK ({config.source})")
    click.echo(json.dumps(effective_settings(config), indent=2, default=str))
    for warning in config_warnings(config):
        click.echo(f"warning: {warning}", err=True)


@click.command("migrate")
@config_option
@click.option("--create-db", is_flag=True, help="Create the database if it does not exist.")
@click.pass_context
def migrate_command(ctx: click.Context, create_db: bool) -> None:
    """Create or upgrade the database schema (idempotent, transactional)."""
    from fsrecrypt import db

    config = ctx.ensure_object(State).config
    applied = db.migrate(config.database.dsn, create_db=create_db)
    if applied:
        for m in applied:
            click.echo(f"applied {m.version:04d}_{m.name}")
    else:
        click.echo("schema is up to date")
