"""``fsrecrypt rotate``: move a tenant to a new key (``fsrecrypt.lifecycle.rotate``)."""

from __future__ import annotations

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import echo_json, operator, services_for, user_option
from fsrecrypt.cli.jobs import detach_option, work_or_detach


@click.command("rotate")
@config_option
@click.option("--tenant", "tenant_name", required=True, help="Tenant to rotate.")
@click.option("--to", "to_key", required=True, help="New key id (keyring id or KMS id/ARN/alias).")
@click.option(
    "--rewrite-headers",
    is_flag=True,
    help="Also rewrite every object so its header is wrapped by the new key (see below).",
)
@user_option
@detach_option
@click.pass_context
def rotate_command(
    ctx: click.Context,
    tenant_name: str,
    to_key: str,
    rewrite_headers: bool,
    user_id: str | None,
    detach: bool,
) -> None:
    """Move a tenant to a new key without re-encrypting any audio.

    \b
    1. The tenant's key is switched at once: recordings stored from now on
       (also by a running daemon) are wrapped by KEY.
    2. The database copy of every stored recording's data key is re-wrapped
       by KEY (KMS ReEncrypt; the local keyring unwraps and wraps in memory).
       Reads use this copy, so this is all that is needed to keep playing
       recordings while the old key stays available and trusted (scheduled
       rotation, a tenant moving to its own key).

    Each object's header still holds the old wrapping, which lets the old
    key (plus a copy of the object) decrypt it without the database. Use
    --rewrite-headers when the old key must be retired completely (deleted
    from the keyring, KMS key scheduled for deletion, confirmed compromise):
    each object is copied under a new name with a header wrapped by KEY
    (same message id, frames copied byte for byte), the row is switched to
    it and the old object is deleted (all versions).

    The work is a job (one item per recording): this command works it with
    a progress bar while any 'fsrecrypt worker' helps, or with --detach
    leaves it to the workers ('fsrecrypt jobs show ID').

    Resumable and idempotent: kill it at any point and run it again (it
    resumes the unfinished job); rows already on KEY are skipped. Prints a
    JSON summary; exits non-zero if any recording could not be rotated.
    """
    from fsrecrypt.lifecycle.rotate import RotationIncomplete, rotation_summary, start_rotation

    services = services_for(ctx)
    try:
        job = start_rotation(
            services,
            tenant_name,
            to_key,
            rewrite_headers=rewrite_headers,
            user_id=operator(user_id),
        )
        final = work_or_detach(services, job, detach=detach, desc=f"rotate {tenant_name}")
    finally:
        services.close()
    if final is None:
        return
    summary = rotation_summary(final)
    echo_json(summary.as_dict())
    if summary.failures or summary.remaining:
        raise RotationIncomplete(
            f"{len(summary.failures)} recording(s) of tenant {tenant_name} were not rotated "
            f"({summary.remaining} still on another key or header): "
            + "; ".join(f"{rid}: {why}" for rid, why in list(summary.failures.items())[:10])
        )
