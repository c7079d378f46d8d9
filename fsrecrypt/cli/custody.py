"""``fsrecrypt custody ID [--check FILE]``: one recording's chain of custody as JSON.

``fsrecrypt custody --fill-missing [--tenant NAME]`` fingerprints the
recordings stored before fingerprints existed, from their decrypted objects.
"""

from __future__ import annotations

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import ProgressBar, echo_json, operator, services_for, user_option
from fsrecrypt.errors import ConfigError


@click.command("custody")
@config_option
@click.argument("recording_id", required=False)
@click.option(
    "--check",
    "check_file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Compare this (decrypted) file with the recording's keyed fingerprint.",
)
@click.option(
    "--fill-missing",
    is_flag=True,
    help="Fingerprint recordings stored before fingerprints, from their decrypted objects.",
)
@click.option("--tenant", "tenant_name", default=None, help="With --fill-missing: one tenant.")
@user_option
@click.pass_context
def custody_command(
    ctx: click.Context,
    recording_id: str | None,
    check_file: str | None,
    fill_missing: bool,
    tenant_name: str | None,
    user_id: str | None,
) -> None:
    """Print a recording's evidence: creation, storage, fingerprint, events, anchors.

    With --check FILE, compare FILE with the HMAC-SHA256 fingerprint computed
    while the recording was encrypted (exit 1 if it differs). The key is
    derived on the server, so the fingerprint confirms nothing to anyone
    without it. Both are logged (actions custody and custody_check).

    With --fill-missing (and no ID), decrypt and authenticate each stored
    recording that has no fingerprint yet and record one, marked as computed
    from the decrypted object (action custody_fingerprint).
    """
    from fsrecrypt.lifecycle.custody import (
        check_copy,
        fill_missing_fingerprints,
        recording_custody,
    )

    if fill_missing == bool(recording_id) or (tenant_name and not fill_missing):
        raise ConfigError(
            "give a recording ID, or --fill-missing [--tenant NAME] without one",
            hint="e.g. 'fsrecrypt custody 3f2a...' or 'fsrecrypt custody --fill-missing'.",
        )
    services = services_for(ctx)
    try:
        if fill_missing:
            bar = ProgressBar("fingerprint")
            try:
                result = fill_missing_fingerprints(
                    services, tenant_name=tenant_name, user_id=operator(user_id), progress=bar
                )
            finally:
                bar.close()
            echo_json(result.as_dict())
            if result.failures:
                ctx.exit(1)
            return
        assert recording_id is not None
        if check_file:
            with open(check_file, "rb") as f:
                echo_json(check_copy(services, recording_id, f, user_id=operator(user_id)))
            return
        echo_json(recording_custody(services, recording_id, user_id=operator(user_id)))
    finally:
        services.close()
