"""``fsrecrypt keys create/list``: wrapping keys in the local keyring, AWS KMS or the branch key
store (no database); ``keys create-store`` and ``keys rotate-branch`` for branch keys."""

from __future__ import annotations

import click

from fsrecrypt.cli import State, config_option
from fsrecrypt.cli.helpers import echo_json, operator, services_for, user_option


@click.group("keys")
def keys_group() -> None:
    """Manage tenant keys (local keyring, AWS KMS or KMS-protected branch keys)."""


@keys_group.command("create")
@config_option
@click.argument("key_id")
@click.pass_context
def keys_create(ctx: click.Context, key_id: str) -> None:
    """Create KEY_ID (a keyring entry, a KMS key with alias/KEY_ID, or a branch key; 'new'
    lets the branch key store pick the id)."""
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


@keys_group.command("create-store")
@config_option
@click.pass_context
def keys_create_store(ctx: click.Context) -> None:
    """Create the DynamoDB branch key store ([keys] key_store_table; aws-kms-hierarchy)."""
    from fsrecrypt.errors import ConfigError
    from fsrecrypt.keys import build_key_provider

    cfg = ctx.ensure_object(State).config.keys
    if cfg.provider != "aws-kms-hierarchy":
        raise ConfigError(
            "keys create-store needs [keys] provider = 'aws-kms-hierarchy'",
            hint="Set provider, key_store_table and key_store_kms_key in [keys].",
        )
    provider = build_key_provider(cfg)
    click.echo(provider.create_store())  # type: ignore[attr-defined]


@keys_group.command("rotate-branch")
@config_option
@click.option("--tenant", "tenant_name", required=True, help="Tenant whose branch key to version.")
@user_option
@click.pass_context
def keys_rotate_branch(ctx: click.Context, tenant_name: str, user_id: str | None) -> None:
    """Make a new active version of TENANT's branch key (older versions keep decrypting).

    Processes pick the new version up when their cached copy expires
    ([keys] cache_ttl). Prints a JSON summary.
    """
    from fsrecrypt.lifecycle.branch_keys import rotate_branch

    services = services_for(ctx)
    try:
        result = rotate_branch(services, tenant_name, user_id=operator(user_id))
    finally:
        services.close()
    echo_json(result)
