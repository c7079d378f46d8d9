"""``fsrecrypt keys create/list``: wrapping keys in the local keyring or AWS KMS (no database)."""

from __future__ import annotations

import click

from fsrecrypt.cli import State, config_option


@click.group("keys")
def keys_group() -> None:
    """Manage tenant keys (local keyring or AWS KMS)."""


@keys_group.command("create")
@config_option
@click.argument("key_id")
@click.pass_context
def keys_create(ctx: click.Context, key_id: str) -> None:
    """Create KEY_ID (a new keyring entry, or a KMS key with alias/KEY_ID)."""
    from fsrecrypt.keys import build_key_provider

    provider = build_key_provider(ctx.ensure_object(State).config.keys)
    click.echo(provider.create_key(key_id))


@keys_group.command("list")
@config_option
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """List key ids and creation dates (never key material)."""
    from fsrecrypt.keys import build_key_provider

    provider = build_key_provider(ctx.ensure_object(State).config.keys)
    for info in provider.list_keys():
        click.echo(f"{info.key_id}\t{info.created_at or '-'}\t{info.description}".rstrip())
