"""``fsrecrypt tenants add/list``: who owns recordings, and the key that wraps them."""

from __future__ import annotations

import json

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import services_for


@click.group("tenants")
def tenants_group() -> None:
    """Manage tenants and their keys."""


@tenants_group.command("add")
@config_option
@click.argument("name")
@click.option("--key", "key_id", help="Key id (local) or KMS key id/ARN/alias.")
@click.option(
    "--branch-key",
    help="aws-kms-hierarchy: 'new' (create a branch key) or an existing branch key id.",
)
@click.pass_context
def tenants_add(ctx: click.Context, name: str, key_id: str | None, branch_key: str | None) -> None:
    """Add tenant NAME whose recordings are wrapped by KEY (or a branch key)."""
    from fsrecrypt.pipeline import add_branch_key_tenant, add_tenant

    if (key_id is None) == (branch_key is None):
        raise click.UsageError("give exactly one of --key and --branch-key")
    services = services_for(ctx)
    try:
        if branch_key is not None:
            tenant = add_branch_key_tenant(services, name, branch_key)
        else:
            tenant = add_tenant(services, name, str(key_id))
    finally:
        services.close()
    click.echo(json.dumps({"id": tenant.id, "name": tenant.name, "key": tenant.kms_key_id}))


@tenants_group.command("list")
@config_option
@click.pass_context
def tenants_list(ctx: click.Context) -> None:
    """List tenants."""
    services = services_for(ctx)
    try:
        tenants = services.db.tenants()
    finally:
        services.close()
    for t in tenants:
        click.echo(f"{t.name}\t{t.id}\t{t.kms_key_id}\t{t.created_at.isoformat()}")
