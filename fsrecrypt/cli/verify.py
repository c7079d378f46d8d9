"""``fsrecrypt verify``: prove stored recordings are intact (``fsrecrypt.lifecycle.verify``)."""

from __future__ import annotations

import json

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import operator, services_for, user_option
from fsrecrypt.cli.jobs import detach_option, work_or_detach


@click.command("verify")
@config_option
@click.option("--tenant", "tenant_name", default=None, help="Only this tenant's recordings.")
@click.option(
    "--sample",
    "sample_percent",
    type=float,
    default=100.0,
    show_default=True,
    help="Check a random PERCENT of the recordings.",
)
@user_option
@detach_option
@click.pass_context
def verify_command(
    ctx: click.Context,
    tenant_name: str | None,
    sample_percent: float,
    user_id: str | None,
    detach: bool,
) -> None:
    """Prove stored recordings are intact and readable.

    For each: the object exists, its size matches the row, its header parses
    and belongs to the recording, its data key unwraps, every frame
    authenticates (decrypted and discarded) and the audio size matches.
    Prints each failure and a JSON summary; exits non-zero on any failure.
    The work is a job: --detach leaves it to 'fsrecrypt worker' processes.
    """
    from fsrecrypt.lifecycle.verify import (
        VerificationFailed,
        VerificationNotPermitted,
        start_verify,
        verify_report,
    )

    services = services_for(ctx)
    try:
        job = start_verify(
            services,
            user_id=operator(user_id),
            tenant_name=tenant_name,
            sample_percent=sample_percent,
        )
        final = work_or_detach(services, job, detach=detach, desc="verify")
    finally:
        services.close()
    if final is None:
        return
    report = verify_report(final)
    for rec_id, why in sorted(report.failures.items()):
        click.echo(f"{'DENIED' if rec_id in report.denied else 'FAIL'} {rec_id}: {why}")
    click.echo(
        json.dumps(
            {
                "checked": report.checked,
                "ok": report.ok,
                "failed": len(report.failures),
                "permission_denied": len(report.denied),
                "total_stored": report.total_stored,
                "bytes_verified": report.bytes_verified,
                "seconds": report.seconds,
            }
        )
    )
    damaged = len(report.failures) - len(report.denied)
    if damaged:
        also = (
            f"; {len(report.denied)} more could not be read by this user (permission, not "
            "damage: DENIED above)"
            if report.denied
            else ""
        )
        raise VerificationFailed(
            f"{damaged} of {report.checked} recording(s) failed verification (FAIL above){also}"
        )
    if report.denied:
        raise VerificationNotPermitted(
            f"{len(report.denied)} of {report.checked} recording(s) could not be read by this "
            "user (permission denied, DENIED above); nothing found damaged"
        )
