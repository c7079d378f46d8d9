"""``fsrecrypt serve`` and ``fsrecrypt apikeys``: parse, call one ``fsrecrypt.web`` function, print.

Loaded lazily by the root group (``LAZY_COMMANDS``), and ``--help`` loads it
too: so only click and the CLI's own helpers are imported here, and
``fsrecrypt.web`` (Flask, gevent) inside the commands. ``serve`` monkey-patches
before that import, as gevent requires.
"""

from __future__ import annotations

import json

import click

from fsrecrypt.cli import State, config_option

ROLE_NAMES = ("listen", "download", "ingest", "admin")
"""``fsrecrypt.web.auth.ROLES`` again, so ``--help`` need not import Flask (a test compares)."""


@click.command("serve")
@config_option
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Address to listen on (default: [playback] listen).",
)
@click.pass_context
def serve_command(ctx: click.Context, listen: str | None) -> None:
    """Serve the playback API and page (streaming decryption with seek)."""
    from gevent import monkey

    monkey.patch_all()
    from fsrecrypt.web import run_server

    def listening(url: str) -> None:
        click.echo(f"fsrecrypt serve: listening on {url}", err=True)

    run_server(ctx.ensure_object(State).config, listen, listening=listening)


@click.group("apikeys")
def apikeys_group() -> None:
    """Manage the playback API keys (stored only as hashes)."""


@apikeys_group.command("create")
@config_option
@click.option("--tenant", "tenant_name", required=True, help="Tenant the key may read.")
@click.option("--user", "user_id", required=True, help="User id recorded in the access log.")
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(ROLE_NAMES),
    help="What the key may do (repeatable; default listen): listen = stream and playback "
    "URLs, download = whole file, ingest = upload, admin = holds, erasure, custody.",
)
@click.option(
    "--on-behalf-of",
    "on_behalf_of",
    is_flag=True,
    help="A service's key: it may name the end user it acts for (X-On-Behalf-Of).",
)
@click.pass_context
def apikeys_create(
    ctx: click.Context,
    tenant_name: str,
    user_id: str,
    roles: tuple[str, ...],
    on_behalf_of: bool,
) -> None:
    """Create a key for USER of TENANT and print it once (only its hash is kept)."""
    from fsrecrypt.web import create_api_key

    services = ctx.ensure_object(State).services()
    try:
        row, key = create_api_key(
            services, tenant_name, user_id, roles=roles or ("listen",), on_behalf_of=on_behalf_of
        )
    finally:
        services.close()
    click.echo(key)
    acting = "; may act for end users" if row.on_behalf_of else ""
    click.echo(
        f"key id {row.key_id} for user {row.user_id!r} of tenant {row.tenant_name!r}, "
        f"roles {', '.join(row.roles)}{acting}; store the key now, it cannot be shown again",
        err=True,
    )


@apikeys_group.command("list")
@config_option
@click.option("--tenant", "tenant_name", default=None, help="Only this tenant's keys.")
@click.pass_context
def apikeys_list(ctx: click.Context, tenant_name: str | None) -> None:
    """List key ids, users and state (never the keys)."""
    from fsrecrypt.web import list_api_keys
    from fsrecrypt.web.schemas import iso

    services = ctx.ensure_object(State).services()
    try:
        rows = list_api_keys(services, tenant_name)
    finally:
        services.close()
    for r in rows:
        state = f"revoked {iso(r.revoked_at)}" if r.revoked_at else "active"
        click.echo(
            json.dumps(
                {
                    "key_id": r.key_id,
                    "tenant": r.tenant_name,
                    "user": r.user_id,
                    "roles": list(r.roles),
                    "on_behalf_of": r.on_behalf_of,
                    "created_at": iso(r.created_at),
                    "last_used_at": iso(r.last_used_at),
                    "state": state,
                }
            )
        )


@apikeys_group.command("revoke")
@config_option
@click.argument("key_id")
@click.pass_context
def apikeys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke KEY_ID at once (its signed playback URLs stop working too)."""
    from fsrecrypt.web import revoke_api_key

    services = ctx.ensure_object(State).services()
    try:
        row = revoke_api_key(services, key_id)
    finally:
        services.close()
    click.echo(f"revoked key {row.key_id} of user {row.user_id!r} (tenant {row.tenant_name!r})")
