"""``fsrecrypt run`` and ``fsrecrypt health``: parse, call one ``fsrecrypt.daemon`` function, print.

Loaded lazily by the root group (``LAZY_COMMANDS``), and ``--help`` loads it
too: so only click and the CLI's own helpers are imported here, and
``fsrecrypt.daemon`` (gevent, structlog, prometheus_client) inside the
commands. ``run`` monkey-patches before that import: boto3/botocore, urllib3
and psycopg2 must see the patched socket/ssl/threading modules.
"""

from __future__ import annotations

import json

import click

from fsrecrypt.cli import State, config_option


@click.command("run")
@config_option
@click.pass_context
def run_command(ctx: click.Context) -> None:
    """Run the daemon: store every recording FreeSWITCH finishes (Ctrl-C/SIGTERM to stop)."""
    from gevent import monkey

    monkey.patch_all()
    from fsrecrypt.daemon import run_daemon

    state = ctx.ensure_object(State)
    ctx.exit(run_daemon(state.config, state.config_path))


@click.command("health")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def health_command(ctx: click.Context, as_json: bool) -> None:
    """Check FreeSWITCH, database, keys, store, backlog and the daemon (exit 0/1/2)."""
    from fsrecrypt.daemon.health import LEVEL_NAME, overall_level, run_health

    checks = run_health(ctx.ensure_object(State).config)
    level = overall_level(checks)
    if as_json:
        doc = {
            "status": LEVEL_NAME[level],
            "checks": {c.name: {"status": LEVEL_NAME[c.level], "detail": c.detail} for c in checks},
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        for c in checks:
            click.echo(f"{LEVEL_NAME[c.level]:9} {c.name:10} {c.detail}")
        click.echo(f"overall: {LEVEL_NAME[level]}")
    ctx.exit(level)
