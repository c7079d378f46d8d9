"""``fsrecrypt tenants add/list/set-keys``: who owns recordings, and the keys that wrap them."""

from __future__ import annotations

import json

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import ProgressBar, echo_json, operator, services_for, user_option


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
@click.option(
    "--escrow-key",
    "escrow_keys",
    multiple=True,
    help="Also wrap every recording with this key (KMS key ARN or raw-aes:ID); repeatable.",
)
@click.pass_context
def tenants_add(
    ctx: click.Context,
    name: str,
    key_id: str | None,
    branch_key: str | None,
    escrow_keys: tuple[str, ...],
) -> None:
    """Add tenant NAME whose recordings are wrapped by KEY or a branch key (and escrow keys)."""
    from fsrecrypt.pipeline import add_branch_key_tenant, add_tenant
    from fsrecrypt.pipeline.escrow import add_tenant_with_escrow

    if (key_id is None) == (branch_key is None):
        raise click.UsageError("give exactly one of --key and --branch-key")
    if branch_key is not None and escrow_keys:
        raise click.UsageError(
            "--escrow-key goes with --key: a branch key tenant's recovery is the branch key "
            "store's KMS key (see the README's key hierarchy section)"
        )
    services = services_for(ctx)
    try:
        if branch_key is not None:
            tenant = add_branch_key_tenant(services, name, branch_key)
        elif escrow_keys:
            tenant = add_tenant_with_escrow(services, name, str(key_id), escrow_keys)
        else:
            tenant = add_tenant(services, name, str(key_id))
    finally:
        services.close()
    click.echo(
        json.dumps(
            {
                "id": tenant.id,
                "name": tenant.name,
                "key": tenant.kms_key_id,
                **({"escrow_keys": list(tenant.escrow_key_ids)} if escrow_keys else {}),
            }
        )
    )


@tenants_group.command("list")
@config_option
@click.pass_context
def tenants_list(ctx: click.Context) -> None:
    """List tenants: name, id, key, created, escrow keys (comma-separated, - if none)."""
    services = services_for(ctx)
    try:
        tenants = services.db.tenants()
    finally:
        services.close()
    for t in tenants:
        escrow = ",".join(t.escrow_key_ids) or "-"
        click.echo(f"{t.name}\t{t.id}\t{t.kms_key_id}\t{t.created_at.isoformat()}\t{escrow}")


@tenants_group.command("set-keys")
@config_option
@click.argument("name")
@click.option("--key", "key_id", required=True, help="The primary key (as for 'tenants add').")
@click.option(
    "--escrow-key",
    "escrow_keys",
    multiple=True,
    help="An escrow key (KMS key ARN or raw-aes:ID); repeatable. None given: no escrow.",
)
@user_option
@click.pass_context
def tenants_set_keys(
    ctx: click.Context,
    name: str,
    key_id: str,
    escrow_keys: tuple[str, ...],
    user_id: str | None,
) -> None:
    """Set tenant NAME's keys: primary KEY and exactly the escrow keys named.

    \b
    Every key is checked first. Recordings stored from now on carry one
    wrapped data key per key. A new KEY goes through 'fsrecrypt rotate';
    every stored recording then gains the escrow copies it lacks (and loses
    those of keys no longer named) in the database. Resumable: run it again
    after a failure or a kill. Prints a JSON summary; exits non-zero if
    any recording was not brought to the new keys.
    """
    from fsrecrypt.lifecycle.escrow import set_tenant_keys
    from fsrecrypt.lifecycle.rotate import RotationIncomplete

    services = services_for(ctx)
    bar = ProgressBar(f"set-keys {name}")
    try:
        summary = set_tenant_keys(
            services, name, key_id, escrow_keys, user_id=operator(user_id), progress=bar
        )
    finally:
        bar.close()
        services.close()
    echo_json(summary.as_dict())
    if summary.failures or summary.remaining:
        raise RotationIncomplete(
            f"{len(summary.failures)} recording(s) of tenant {name} were not brought to the "
            f"new keys ({summary.remaining} left): "
            + "; ".join(f"{rid}: {why}" for rid, why in list(summary.failures.items())[:10])
        )
