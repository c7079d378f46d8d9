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
@click.option("--key", "key_id", required=True, help="Key id (local) or KMS key id/ARN/alias.")
@click.pass_context
def tenants_add(ctx: click.Context, name: str, key_id: str) -> None:
    """Add tenant NAME whose recordings are wrapped by KEY."""
    from fsrecrypt.pipeline import add_tenant

    services = services_for(ctx)
    try:
        tenant = add_tenant(services, name, key_id)
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
