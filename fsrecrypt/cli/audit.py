"""``fsrecrypt audit verify|export``: check and export the tamper-evident access log."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Iterator
from typing import IO

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import operator, services_for, user_option
from fsrecrypt.cli.output import atomic_output


@click.group("audit")
def audit_group() -> None:
    """Check and export the tamper-evident access log."""


@audit_group.command("verify")
@config_option
@click.option("--tenant", "tenant_name", default=None, help="Check only this tenant's chain.")
@user_option
@click.pass_context
def audit_verify_command(ctx: click.Context, tenant_name: str | None, user_id: str | None) -> None:
    """Recompute every hash chain; name edited, deleted or reordered rows.

    Exits non-zero if anything is wrong. The run itself is logged (action
    audit_verify) after the check, so it never affects its own result.
    """
    from fsrecrypt.lifecycle.audit import AuditChainBroken, run_audit_verification

    services = services_for(ctx)
    try:
        result = run_audit_verification(
            services, tenant_name=tenant_name, user_id=operator(user_id)
        )
    finally:
        services.close()
    for problem in result.problems:
        click.echo(problem.line())
    click.echo(json.dumps(result.summary()))
    if not result.ok:
        raise AuditChainBroken(
            f"the access log is not intact: {len(result.problems)} problem(s) in "
            f"{result.rows} rows (listed above)"
        )


@audit_group.command("export")
@config_option
@click.option("--tenant", "tenant_name", required=True, help="Tenant whose log to export.")
@click.option("--from", "from_", default=None, help="Start (inclusive), ISO 8601; UTC if naive.")
@click.option("--to", "to", default=None, help="End (exclusive), ISO 8601; UTC if naive.")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "-o", "--output", "output_path", default=None, help="File to write (default: stdout)."
)
@user_option
@click.pass_context
def audit_export_command(
    ctx: click.Context,
    tenant_name: str,
    from_: str | None,
    to: str | None,
    fmt: str,
    output_path: str | None,
    user_id: str | None,
) -> None:
    """Write a tenant's access log rows (with their hashes) as JSON lines or CSV.

    The hashes are included so an auditor can recompute the chain without
    database access. The export itself is logged (action audit_export).
    """
    from fsrecrypt.lifecycle.audit import ExportWindow, export_audit_log

    window = ExportWindow.parse(from_, to)

    @contextlib.contextmanager
    def open_output() -> Iterator[IO[str]]:
        if not output_path:
            yield sys.stdout
            return
        with atomic_output(output_path) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            yield text
            text.flush()
            text.detach()

    services = services_for(ctx)
    try:
        count = export_audit_log(
            services,
            tenant_name=tenant_name,
            window=window,
            fmt=fmt,
            user_id=operator(user_id),
            open_output=open_output,
        )
    finally:
        services.close()
    if output_path:
        click.echo(json.dumps({"rows": count, "out": output_path, "format": fmt}))
